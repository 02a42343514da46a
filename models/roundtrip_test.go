package models_test

import (
	"reflect"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm/schema"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// Every column of every model survives a write and a read, on both dialects.
// The times are deliberately not UTC and carry nanoseconds: they must come
// back as the same instant, in UTC, truncated to microseconds.
func TestRoundTripEveryColumn(t *testing.T) {
	roundTripEveryColumn(t, modelstest.OpenTestDB(t))
}

// roundTripEveryColumn needs users "user-1" and "user-2" where
// public."user" exists (a reference-migrated database).
func roundTripEveryColumn(t *testing.T, db *models.DB) {
	b := seed(t, db)

	zone := time.FixedZone("UTC+5:30", 5*3600+1800)
	at := func(sec int) *time.Time {
		v := time.Date(2026, 5, 5, 12, 30, sec, 123456789, zone)
		return &v
	}
	fileID := models.NewID()
	modelstest.MustExec(t, db, `INSERT INTO `+db.Table("file")+` (id, mesh_id, name, size_bytes, minio_key) VALUES (?, ?, ?, ?, ?)`,
		fileID, b.mesh.ID, "f.zip", 10, "k")

	// A second member in another mesh keeps the fully-populated rows
	// independent of the seed rows.
	mesh := &models.Mesh{
		ID: models.NewID(), Name: "full", Slug: "full", OwnerUserID: "user-2",
		Visibility: models.VisibilityPublic, Transport: models.TransportSelfHosted,
		MaxPeers: ptr(int32(7)), Tier: models.TierTeam, CreatedAt: *at(1), ArchivedAt: at(2),
		OwnerPubkey: ptr("op"), OwnerSecretKey: ptr("osk"), RootKey: ptr("rk"),
		SelfEditable: models.JSON(`{"displayName":false,"roleTag":true,"groups":false,"messageMode":true}`),
	}
	member := &models.Member{
		ID: models.NewID(), MeshID: mesh.ID, UserID: ptr("user-2"), PeerPubkey: "cc", DisplayName: "carol",
		Role: models.RoleAdmin, JoinedAt: *at(3), LastSeenAt: at(4), RevokedAt: at(5), RoleTag: ptr("reviewer"),
		DefaultGroups: models.JSON(`[{"name":"backend","role":"lead"}]`), MessageMode: ptr(models.MessageModeInbox),
		DashboardUserID: ptr("dash-1"), PeerGrants: models.JSON(`{"aa":["dm"],"bb":[]}`),
	}
	topic := &models.Topic{
		ID: models.NewID(), MeshID: mesh.ID, Name: "deploys", Description: ptr("ship it"),
		Visibility: models.TopicPrivate, CreatedByMemberID: &member.ID, EncryptedKeyPubkey: ptr("ek"),
		CreatedAt: *at(6), ArchivedAt: at(7),
	}
	parent := &models.TopicMessage{ID: models.NewID(), TopicID: topic.ID, SenderMemberID: member.ID, Nonce: "n0", Ciphertext: "c0"}
	mustCreate(t, db, mesh)
	mustCreate(t, db, member)
	mustCreate(t, db, topic)
	mustCreate(t, db, parent)

	message := &models.TopicMessage{
		ID: models.NewID(), TopicID: topic.ID, SenderMemberID: member.ID, SenderSessionPubkey: ptr("sp"),
		Nonce: "n1", Ciphertext: "c1", BodyVersion: 2, ReplyToID: &parent.ID, CreatedAt: *at(8),
	}
	mustCreate(t, db, message)

	type rowCase struct {
		row     any
		created bool // already written above, as a parent of later rows
		where   string
		args    []any
	}
	cases := []rowCase{
		{row: mesh, created: true},
		{row: member, created: true},
		{row: topic, created: true},
		{row: message, created: true},
		{row: &models.Presence{
			ID: models.NewID(), MemberID: member.ID, SessionID: "s1", SessionPubkey: ptr("sp"), DisplayName: ptr("carol-1"),
			PID: 4242, Cwd: "/work", Status: models.StatusDND, StatusSource: models.StatusSourceManual,
			StatusUpdatedAt: *at(9), Summary: ptr("fixing"), Groups: models.JSON(`[{"name":"a"},{"name":"b","role":"x"}]`),
			Role: models.PresenceRoleControlPlane, ConnectedAt: *at(10), LastPingAt: *at(11), DisconnectedAt: at(12),
		}},
		{row: &models.PendingStatus{
			ID: models.NewID(), PID: 77, Cwd: "/p1", Status: models.StatusWorking, StatusSource: models.StatusSourceHook,
			CreatedAt: *at(13), AppliedAt: at(14),
		}},
		{row: &models.MessageQueue{
			ID: models.NewID(), MeshID: mesh.ID, SenderMemberID: member.ID, SenderSessionPubkey: ptr("sp"),
			TargetSpec: "@backend", Priority: models.PriorityNow, Nonce: "n2", Ciphertext: "c2", CreatedAt: *at(15),
			DeliveredAt: at(16), ExpiresAt: at(17), ClientMessageID: ptr("cm-1"), RequestFingerprint: ptr("fp"),
			ClaimedAt: at(18), ClaimID: ptr("presence-1"), ClaimExpiresAt: at(19),
		}},
		{row: &models.AuditLog{
			MeshID: mesh.ID, EventType: "peer_joined", ActorMemberID: &member.ID, ActorDisplayName: ptr("carol"),
			Payload: models.JSON(`{"name":"carol","n":1.5}`), PrevHash: "genesis", Hash: "ab12", CreatedAt: *at(20),
		}},
		{row: &models.PeerState{
			ID: models.NewID(), MeshID: mesh.ID, MemberID: member.ID, Groups: models.JSON(`[{"name":"a"}]`),
			Profile: models.JSON(`{"title":"dev"}`), Visible: true, LastSummary: ptr("sum"), LastDisplayName: ptr("carol"),
			CumulativeStats: models.JSON(`{"messagesIn":1,"messagesOut":2,"toolCalls":3,"errors":4}`),
			LastSeenAt:      at(21), CreatedAt: *at(22), UpdatedAt: *at(23),
		}},
		{row: &models.State{
			ID: models.NewID(), MeshID: mesh.ID, Key: "build", Value: models.JSON(`{"ok":true,"list":[1,"two",null]}`),
			UpdatedByPresence: ptr("presence-1"), UpdatedByName: ptr("carol"), UpdatedAt: *at(24),
		}},
		{row: &models.Stream{ID: models.NewID(), MeshID: mesh.ID, Name: "logs", CreatedByName: ptr("carol"), CreatedAt: *at(25)}},
		{row: &models.Service{
			ID: models.NewID(), MeshID: b.mesh.ID, Name: "svc", Type: "mcp", SourceType: "git", SourceFileID: &fileID,
			SourceGitURL: ptr("https://example.test/r.git"), SourceGitBranch: ptr("dev"), SourceGitSha: ptr("abc"),
			PrevGitSha: ptr("abb"), Description: "d", Instructions: ptr("i"), ToolsSchema: models.JSON(`[{"name":"t"}]`),
			Manifest: models.JSON(`{"v":1}`), Runtime: ptr("node"), Status: ptr("running"), Config: models.JSON(`{"a":"b"}`),
			LastHealth: at(26), RestartCount: ptr(int32(3)), Version: ptr(int32(4)), Scope: models.JSON(`"mesh"`),
			DeployedBy: &b.alice.ID, DeployedByName: ptr("alice"), CreatedAt: *at(27), UpdatedAt: *at(28),
		}},
		{row: &models.TopicMember{TopicID: topic.ID, MemberID: member.ID, Role: models.TopicRoleObserver, JoinedAt: *at(29), LastReadAt: at(30)},
			where: "topic_id = ? AND member_id = ?", args: []any{topic.ID, member.ID}},
		{row: &models.TopicMemberKey{
			ID: models.NewID(), TopicID: topic.ID, MemberID: member.ID, EncryptedKey: "ek", Nonce: "n3", CreatedAt: *at(31), RotatedAt: at(32),
		}},
		{row: &models.Notification{
			ID: models.NewID(), MeshID: mesh.ID, TopicID: topic.ID, MessageID: message.ID, RecipientMemberID: b.bob.ID,
			SenderMemberID: member.ID, Kind: "reply", CreatedAt: *at(33), ReadAt: at(34),
		}},
	}

	covered := map[reflect.Type]bool{}
	for _, c := range cases {
		typ := reflect.TypeOf(c.row).Elem()
		covered[typ] = true
		t.Run(typ.Name(), func(t *testing.T) {
			if !c.created {
				mustCreate(t, db, c.row)
			}
			assertNoZeroField(t, c.row)

			got := reflect.New(typ).Interface()
			where, args := c.where, c.args
			if where == "" {
				where, args = "id = ?", []any{reflect.ValueOf(c.row).Elem().FieldByName("ID").Interface()}
			}
			if err := db.WithContext(t.Context()).Where(where, args...).Take(got).Error; err != nil {
				t.Fatalf("read back: %v", err)
			}
			assertSameRow(t, c.row, got)
		})
	}
	for _, m := range allModelTypes() {
		if !covered[m] {
			t.Errorf("no round-trip case for %s", m.Name())
		}
	}
}

// allModelTypes is the exported model list the round trip must cover.
func allModelTypes() []reflect.Type {
	return []reflect.Type{
		reflect.TypeFor[models.Mesh](), reflect.TypeFor[models.Member](), reflect.TypeFor[models.Presence](),
		reflect.TypeFor[models.PendingStatus](), reflect.TypeFor[models.MessageQueue](), reflect.TypeFor[models.AuditLog](),
		reflect.TypeFor[models.PeerState](), reflect.TypeFor[models.State](), reflect.TypeFor[models.Stream](),
		reflect.TypeFor[models.Service](), reflect.TypeFor[models.Topic](), reflect.TypeFor[models.TopicMember](),
		reflect.TypeFor[models.TopicMessage](), reflect.TypeFor[models.TopicMemberKey](), reflect.TypeFor[models.Notification](),
	}
}

// Rows written with only their required fields get the reference's defaults,
// and nullable columns without a default stay NULL.
func TestDefaultsAndNulls(t *testing.T) {
	defaultsAndNulls(t, modelstest.OpenTestDB(t))
}

// defaultsAndNulls needs user "user-1" where public."user" exists.
func defaultsAndNulls(t *testing.T, db *models.DB) {
	b := seed(t, db)
	start := time.Now().UTC().Add(-time.Minute)

	rows := []any{
		&models.Mesh{ID: models.NewID(), Name: "n", Slug: "n", OwnerUserID: "user-1"},
		&models.Member{ID: models.NewID(), MeshID: b.mesh.ID, PeerPubkey: "dd", DisplayName: "dave"},
		&models.Presence{ID: models.NewID(), MemberID: b.alice.ID, SessionID: "s", Cwd: ""},
		&models.PendingStatus{ID: models.NewID(), PID: 1, Cwd: "/x", Status: models.StatusIdle, StatusSource: models.StatusSourceHook},
		&models.MessageQueue{ID: models.NewID(), MeshID: b.mesh.ID, SenderMemberID: b.alice.ID, TargetSpec: "*", Nonce: "n", Ciphertext: "c"},
		&models.AuditLog{MeshID: b.mesh.ID, EventType: "e", PrevHash: "genesis", Hash: "h"},
		&models.PeerState{ID: models.NewID(), MeshID: b.mesh.ID, MemberID: b.alice.ID},
		&models.State{ID: models.NewID(), MeshID: b.mesh.ID, Key: "k", Value: models.JSON(`1`)},
		&models.Stream{ID: models.NewID(), MeshID: b.mesh.ID, Name: "s"},
		&models.Service{ID: models.NewID(), MeshID: b.mesh.ID, Name: "svc", Type: "mcp", SourceType: "inline", Description: "d"},
		&models.Topic{ID: models.NewID(), MeshID: b.mesh.ID, Name: "t"},
		&models.TopicMember{TopicID: b.topic.ID, MemberID: b.bob.ID},
		&models.TopicMessage{ID: models.NewID(), TopicID: b.topic.ID, SenderMemberID: b.bob.ID, Nonce: "n", Ciphertext: "c"},
		&models.TopicMemberKey{ID: models.NewID(), TopicID: b.topic.ID, MemberID: b.bob.ID, EncryptedKey: "k", Nonce: "n"},
		&models.Notification{ID: models.NewID(), MeshID: b.mesh.ID, TopicID: b.topic.ID, MessageID: b.message.ID, RecipientMemberID: b.bob.ID, SenderMemberID: b.alice.ID},
	}
	cache := &sync.Map{}
	for _, row := range rows {
		typ := reflect.TypeOf(row).Elem()
		t.Run(typ.Name(), func(t *testing.T) {
			mustCreate(t, db, row)
			s, err := schema.Parse(row, cache, db.NamingStrategy)
			if err != nil {
				t.Fatal(err)
			}
			got := reflect.New(typ).Interface()
			q := db.WithContext(t.Context())
			for _, pk := range s.PrimaryFields {
				v, _ := pk.ValueOf(t.Context(), reflect.ValueOf(row).Elem())
				q = q.Where(pk.DBName+" = ?", v)
			}
			if err := q.Take(got).Error; err != nil {
				t.Fatalf("read back: %v", err)
			}
			gv := reflect.ValueOf(got).Elem()
			for _, f := range s.Fields {
				v := gv.FieldByName(f.Name)
				switch {
				case f.HasDefaultValue && v.IsZero():
					t.Errorf("%s has a default but read back empty", f.DBName)
				case !f.HasDefaultValue && f.FieldType.Kind() == reflect.Pointer && !v.IsNil():
					t.Errorf("%s: want NULL, got %v", f.DBName, v.Elem())
				case !f.HasDefaultValue && f.FieldType == jsonDataType && v.Interface().(models.JSON) != nil && f.DBName != "value":
					t.Errorf("%s: want NULL, got %s", f.DBName, v.Interface())
				}
				if tm, ok := v.Interface().(time.Time); ok && f.HasDefaultValue {
					if tm.Before(start) || tm.After(time.Now().UTC().Add(time.Minute)) || tm.Location() != time.UTC {
						t.Errorf("%s: default time %v is not about now in UTC", f.DBName, tm)
					}
				}
			}
			checkDefaultValues(t, got)

			// gorm reads database defaults back with RETURNING, so the row
			// written holds them too, already as UTC times.
			assertSameRow(t, got, row)
		})
	}
}

// checkDefaultValues pins the reference's default values.
func checkDefaultValues(t *testing.T, row any) {
	t.Helper()
	eqJSON := func(name string, got models.JSON, want string) {
		t.Helper()
		if !sameJSON(t, got, models.JSON(want)) {
			t.Errorf("%s: want default %s, got %s", name, want, got)
		}
	}
	eq := func(name string, got, want any) {
		t.Helper()
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: want default %#v, got %#v", name, want, got)
		}
	}
	switch r := row.(type) {
	case *models.Mesh:
		eq("visibility", r.Visibility, models.VisibilityPrivate)
		eq("transport", r.Transport, models.TransportManaged)
		eq("tier", r.Tier, models.TierFree)
		eqJSON("self_editable", r.SelfEditable, `{"displayName":true,"roleTag":true,"groups":true,"messageMode":true}`)
	case *models.Member:
		eq("role", r.Role, models.RoleMember)
		eqJSON("default_groups", r.DefaultGroups, `[]`)
		eq("message_mode", r.MessageMode, ptr(models.MessageModePush))
		eqJSON("peer_grants", r.PeerGrants, `{}`)
	case *models.Presence:
		eq("status", r.Status, models.StatusIdle)
		eq("status_source", r.StatusSource, models.StatusSourceJSONL)
		eq("role", r.Role, models.PresenceRoleSession)
		eqJSON("groups", r.Groups, `[]`)
	case *models.MessageQueue:
		eq("priority", r.Priority, models.PriorityNext)
	case *models.AuditLog:
		eqJSON("payload", r.Payload, `{}`)
		if r.ID <= 0 {
			t.Errorf("audit_log id: want a generated id, got %d", r.ID)
		}
	case *models.PeerState:
		eqJSON("groups", r.Groups, `[]`)
		eqJSON("profile", r.Profile, `{}`)
		eqJSON("cumulative_stats", r.CumulativeStats, `{"messagesIn":0,"messagesOut":0,"toolCalls":0,"errors":0}`)
	case *models.Service:
		eq("source_git_branch", r.SourceGitBranch, ptr("main"))
		eq("status", r.Status, ptr("stopped"))
		eqJSON("config", r.Config, `{}`)
		eq("restart_count", r.RestartCount, ptr(int32(0)))
		eq("version", r.Version, ptr(int32(1)))
		eqJSON("scope", r.Scope, `{"type":"peer"}`)
	case *models.Topic:
		eq("visibility", r.Visibility, models.TopicPublic)
	case *models.TopicMember:
		eq("role", r.Role, models.TopicRoleMember)
	case *models.TopicMessage:
		eq("body_version", r.BodyVersion, int32(1))
	case *models.Notification:
		eq("kind", r.Kind, "mention")
	}
}

// peer_state.visible defaults to true in the database but an explicit false
// must be stored as false (gorm would replace a zero value that has a gorm
// default, so the field deliberately has none).
func TestPeerStateVisibleFalseIsKept(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	b := seed(t, db)
	ps := &models.PeerState{ID: models.NewID(), MeshID: b.mesh.ID, MemberID: b.alice.ID, Visible: false}
	mustCreate(t, db, ps)
	var got models.PeerState
	if err := db.WithContext(t.Context()).Take(&got, "id = ?", ps.ID).Error; err != nil {
		t.Fatal(err)
	}
	if got.Visible {
		t.Fatal("visible: want false, got true")
	}
}
