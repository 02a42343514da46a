package models_test

import (
	"errors"
	"testing"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// Both dialects enforce the same enums, JSON validity, keys and cascades, and
// report violations as the same gorm errors.
func TestConstraints(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	b := seed(t, db)
	ctx := t.Context()

	t.Run("enum values", func(t *testing.T) {
		for _, status := range []models.PresenceStatus{models.StatusIdle, models.StatusWorking, models.StatusDND} {
			mustCreate(t, db, &models.Presence{ID: models.NewID(), MemberID: b.alice.ID, SessionID: "s", Cwd: "/", Status: status})
		}
		err := db.WithContext(ctx).Create(&models.Presence{ID: models.NewID(), MemberID: b.alice.ID, SessionID: "s", Cwd: "/", Status: "busy"}).Error
		if err == nil {
			t.Error("presence.status 'busy': want an error")
		}
		err = db.WithContext(ctx).Create(&models.TopicMember{TopicID: b.topic.ID, MemberID: b.alice.ID, Role: "owner"}).Error
		if err == nil {
			t.Error("topic_member.role 'owner': want an error")
		}
	})

	t.Run("invalid JSON", func(t *testing.T) {
		err := db.WithContext(ctx).Create(&models.State{ID: models.NewID(), MeshID: b.mesh.ID, Key: "bad", Value: models.JSON(`{"a":`)}).Error
		if err == nil {
			t.Error("models.JSON with invalid text: want an error")
		}
		// Raw SQL bypasses models.JSON; the column still refuses.
		err = db.WithContext(ctx).Exec(`INSERT INTO `+db.Table("state")+` (id, mesh_id, "key", value) VALUES (?, ?, ?, ?)`,
			models.NewID(), b.mesh.ID, "bad", `{"a":`).Error
		if err == nil {
			t.Error("raw invalid JSON: want an error")
		}
	})

	t.Run("state value is NOT NULL", func(t *testing.T) {
		err := db.WithContext(ctx).Create(&models.State{ID: models.NewID(), MeshID: b.mesh.ID, Key: "nil"}).Error
		if err == nil {
			t.Error("state with nil value: want an error")
		}
	})

	t.Run("foreign key", func(t *testing.T) {
		err := db.WithContext(ctx).Create(&models.Member{ID: models.NewID(), MeshID: "no-such-mesh", PeerPubkey: "x", DisplayName: "x"}).Error
		if !errors.Is(err, gorm.ErrForeignKeyViolated) {
			t.Errorf("member of unknown mesh: want ErrForeignKeyViolated, got %v", err)
		}
	})

	t.Run("unique", func(t *testing.T) {
		mustCreate(t, db, &models.State{ID: models.NewID(), MeshID: b.mesh.ID, Key: "dup", Value: models.JSON(`1`)})
		err := db.WithContext(ctx).Create(&models.State{ID: models.NewID(), MeshID: b.mesh.ID, Key: "dup", Value: models.JSON(`2`)}).Error
		if !errors.Is(err, gorm.ErrDuplicatedKey) {
			t.Errorf("second (mesh, key): want ErrDuplicatedKey, got %v", err)
		}
		mustCreate(t, db, &models.TopicMember{TopicID: b.topic.ID, MemberID: b.bob.ID})
		err = db.WithContext(ctx).Create(&models.TopicMember{TopicID: b.topic.ID, MemberID: b.bob.ID}).Error
		if !errors.Is(err, gorm.ErrDuplicatedKey) {
			t.Errorf("second topic membership: want ErrDuplicatedKey, got %v", err)
		}
	})

	t.Run("audit id is generated", func(t *testing.T) {
		first := &models.AuditLog{MeshID: b.mesh.ID, EventType: "a", PrevHash: "genesis", Hash: "1"}
		second := &models.AuditLog{MeshID: b.mesh.ID, EventType: "b", PrevHash: "1", Hash: "2"}
		mustCreate(t, db, first)
		mustCreate(t, db, second)
		if first.ID <= 0 || second.ID <= first.ID {
			t.Errorf("audit ids %d, %d: want increasing", first.ID, second.ID)
		}
	})

	t.Run("set null and cascade", func(t *testing.T) {
		m := seed(t, db)
		topic := &models.Topic{ID: models.NewID(), MeshID: m.mesh.ID, Name: "other", CreatedByMemberID: &m.bob.ID}
		mustCreate(t, db, topic)
		reply := &models.TopicMessage{ID: models.NewID(), TopicID: m.topic.ID, SenderMemberID: m.alice.ID, Nonce: "n", Ciphertext: "c", ReplyToID: &m.message.ID}
		mustCreate(t, db, reply)
		mustCreate(t, db, &models.Presence{ID: models.NewID(), MemberID: m.bob.ID, SessionID: "s", Cwd: "/"})
		mustCreate(t, db, &models.MessageQueue{ID: models.NewID(), MeshID: m.mesh.ID, SenderMemberID: m.bob.ID, TargetSpec: "*", Nonce: "n", Ciphertext: "c"})

		if err := db.WithContext(ctx).Delete(&models.TopicMessage{}, "id = ?", m.message.ID).Error; err != nil {
			t.Fatal(err)
		}
		if err := db.WithContext(ctx).Take(reply, "id = ?", reply.ID).Error; err != nil || reply.ReplyToID != nil {
			t.Errorf("reply_to_id after its parent is deleted: %v, %v; want NULL", reply.ReplyToID, err)
		}

		if err := db.WithContext(ctx).Delete(&models.Member{}, "id = ?", m.bob.ID).Error; err != nil {
			t.Fatal(err)
		}
		if err := db.WithContext(ctx).Take(topic, "id = ?", topic.ID).Error; err != nil || topic.CreatedByMemberID != nil {
			t.Errorf("created_by_member_id after the member is deleted: %v, %v; want NULL", topic.CreatedByMemberID, err)
		}
		for _, model := range []any{&models.Presence{}, &models.MessageQueue{}} {
			var n int64
			if err := db.WithContext(ctx).Model(model).Where(map[string]any{sqlColumnOf(model): m.bob.ID}).Count(&n).Error; err != nil || n != 0 {
				t.Errorf("%T rows of a deleted member: %d, %v; want 0", model, n, err)
			}
		}

		if err := db.WithContext(ctx).Delete(&models.Mesh{}, "id = ?", m.mesh.ID).Error; err != nil {
			t.Fatal(err)
		}
		var n int64
		if err := db.WithContext(ctx).Model(&models.Member{}).Where("mesh_id = ?", m.mesh.ID).Count(&n).Error; err != nil || n != 0 {
			t.Errorf("members of a deleted mesh: %d, %v; want 0", n, err)
		}
	})
}

func sqlColumnOf(model any) string {
	if _, ok := model.(*models.Presence); ok {
		return "member_id"
	}
	return "sender_member_id"
}
