package services

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// Topics at the level of 02 §10, with live multicast for `#topic` sends
// (D1), and message_status (02 §7.2). Tables: mesh.topic, topic_member,
// topic_message; the message_queue row of a topic post goes through the
// same transaction as its topic_message row.

type topicRow struct {
	ID          string
	MeshID      string
	Name        string
	Description *string
	Visibility  string
	CreatedAt   time.Time
	ArchivedAt  *time.Time
}

var topicIDPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{20,}$`)

// sendTopic stores a `#<topicId>` post (queue row, already delivered, plus
// its topic_message) and pushes it live to the topic's members' connections.
func (m *MessagingService) sendTopic(ctx context.Context, sender *Conn, req SendRequest, row *QueueRow, reply func(protocol.Ack)) error {
	topicID := strings.TrimPrefix(row.TargetSpec, "#")
	db := m.queue.db
	var topics []topicRow
	if err := db.WithContext(ctx).Raw("SELECT id, mesh_id, name FROM "+db.Table("topic")+" WHERE id = ? AND mesh_id = ? LIMIT 1", topicID, sender.MeshID).Scan(&topics).Error; err != nil {
		return fmt.Errorf("look up topic: %w", err)
	}
	if len(topics) == 0 {
		// [EXT] `#name`, as the SDK's bridge sends: resolve it within the
		// sender's mesh and store the canonical `#<id>` target.
		if id, err := m.resolveTopic(ctx, sender.MeshID, topicID); err == nil {
			if err := db.WithContext(ctx).Raw("SELECT id, mesh_id, name FROM "+db.Table("topic")+" WHERE id = ?", id).Scan(&topics).Error; err != nil {
				return fmt.Errorf("look up topic: %w", err)
			}
			topicID, row.TargetSpec = id, "#"+id
		}
	}
	if len(topics) == 0 {
		reply(rejectAck(req.ID, "not_found: topic "+topicID))
		return nil
	}
	delivered := row.CreatedAt
	row.DeliveredAt = &delivered
	tmID := models.NewID()
	err := db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if err := m.queue.insertWith(ctx, tx, row); err != nil {
			return err
		}
		var replyTo *string
		if req.ReplyToID != "" {
			var n int64
			if err := tx.Raw("SELECT count(*) FROM "+db.Table("topic_message")+" WHERE id = ? AND topic_id = ?", req.ReplyToID, topicID).Scan(&n).Error; err != nil {
				return err
			}
			if n > 0 {
				replyTo = &req.ReplyToID
			}
		}
		return tx.Exec("INSERT INTO "+db.Table("topic_message")+" (id, topic_id, sender_member_id, sender_session_pubkey, nonce, ciphertext, body_version, reply_to_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
			tmID, topicID, sender.MemberID, sender.SenderSessionPubkey(), row.Nonce, row.Ciphertext, req.BodyVersion, replyTo, row.CreatedAt.UTC()).Error
	})
	if err != nil {
		return fmt.Errorf("store topic post: %w", err)
	}
	m.audit.Record(sender.MeshID, "message_sent", sender.MemberID, m.presence.DisplayName(sender), map[string]any{"targetSpec": row.TargetSpec, "priority": row.Priority})
	reply(protocol.Ack{Type: "ack", ID: req.ID, MessageID: row.ID, Queued: true})

	var memberIDs []string
	if err := db.WithContext(ctx).Raw("SELECT member_id FROM "+db.Table("topic_member")+" WHERE topic_id = ?", topicID).Scan(&memberIDs).Error; err != nil {
		return fmt.Errorf("load topic members: %w", err)
	}
	inTopic := make(map[string]bool, len(memberIDs))
	for _, id := range memberIDs {
		inTopic[id] = true
	}
	grants, err := m.members.Grants(ctx, sender.MeshID)
	if err != nil {
		return err
	}
	live := *row
	live.ID = tmID // the live push carries the topic_message id
	f := m.multicastFrame(sender, req, &live, topics[0].Name)
	for _, v := range m.presence.Peers(sender.MeshID, nil) {
		if v.Out == nil || !v.Visible || v.Conn.MemberPubkey == sender.MemberPubkey || !inTopic[v.Conn.MemberID] {
			continue
		}
		if !Allows(grants[v.Conn.MemberPubkey], sender.MemberPubkey, sender.SessionPubkey, "dm") {
			m.metrics.MessagesDroppedGrant.WithLabelValues("dm").Inc()
			continue
		}
		if v.Out.Offer(f) {
			m.metrics.MessagesRouted.WithLabelValues(row.Priority).Inc()
		}
	}
	return nil
}

// TopicCreate creates a topic or reuses the mesh's topic of that name, and
// makes the caller a lead of it.
func (m *MessagingService) TopicCreate(ctx context.Context, c *Conn, name, description, visibility string) (protocol.TopicCreated, error) {
	if name == "" {
		return protocol.TopicCreated{}, newError(protocol.CodeInvalidArgument, "name must be a non-empty string")
	}
	if visibility == "" {
		visibility = "public"
	}
	if visibility != "public" && visibility != "private" && visibility != "dm" {
		return protocol.TopicCreated{}, newError(protocol.CodeInvalidArgument, "visibility must be public, private or dm")
	}
	db := m.queue.db
	var out protocol.TopicCreated
	err := db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		var ids []string
		if err := tx.Raw("SELECT id FROM "+db.Table("topic")+" WHERE mesh_id = ? AND name = ? LIMIT 1", c.MeshID, name).Scan(&ids).Error; err != nil {
			return err
		}
		id, created := "", false
		if len(ids) > 0 {
			id = ids[0]
		} else {
			id, created = models.NewID(), true
			var desc *string
			if description != "" {
				desc = &description
			}
			if err := tx.Exec("INSERT INTO "+db.Table("topic")+" (id, mesh_id, name, description, visibility, created_by_member_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
				id, c.MeshID, name, desc, visibility, c.MemberID, m.now().UTC()).Error; err != nil {
				return err
			}
		}
		if err := m.joinTopicTx(tx, id, c.MemberID, "lead"); err != nil {
			return err
		}
		out = protocol.TopicCreated{Type: "topic_created", Topic: protocol.TopicSummary{ID: id, Name: name, Visibility: visibility}, Created: created}
		return nil
	})
	if err != nil {
		return out, fmt.Errorf("topic create: %w", err)
	}
	m.forgetTopics(c.MemberID)
	return out, nil
}

func (m *MessagingService) joinTopicTx(tx *gorm.DB, topicID, memberID, role string) error {
	db := m.queue.db
	return tx.Exec("INSERT INTO "+db.Table("topic_member")+" (topic_id, member_id, role, joined_at) VALUES (?, ?, ?, ?) ON CONFLICT (topic_id, member_id) DO NOTHING",
		topicID, memberID, role, m.now().UTC()).Error
}

// TopicList lists the mesh's non-archived topics by name.
func (m *MessagingService) TopicList(ctx context.Context, c *Conn) ([]protocol.TopicListEntry, error) {
	db := m.queue.db
	var rows []struct {
		ID          string
		Name        string
		Description *string
		Visibility  string
		MemberCount int
		CreatedAt   time.Time
	}
	err := db.WithContext(ctx).Raw("SELECT t.id, t.name, t.description, t.visibility, (SELECT count(*) FROM "+db.Table("topic_member")+" tm WHERE tm.topic_id = t.id) AS member_count, t.created_at FROM "+
		db.Table("topic")+" t WHERE t.mesh_id = ? AND t.archived_at IS NULL ORDER BY t.name", c.MeshID).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("topic list: %w", err)
	}
	out := make([]protocol.TopicListEntry, 0, len(rows))
	for _, r := range rows {
		out = append(out, protocol.TopicListEntry{ID: r.ID, Name: r.Name, Description: r.Description, Visibility: r.Visibility, MemberCount: r.MemberCount, CreatedAt: protocol.ISO(r.CreatedAt)})
	}
	return out, nil
}

// ErrTopicNotFound answers topic_join / topic_leave for an unknown topic.
var ErrTopicNotFound = errors.New("topic not found")

func (m *MessagingService) resolveTopic(ctx context.Context, meshID, ref string) (string, error) {
	db := m.queue.db
	var ids []string
	if topicIDPattern.MatchString(ref) {
		if err := db.WithContext(ctx).Raw("SELECT id FROM "+db.Table("topic")+" WHERE mesh_id = ? AND id = ? LIMIT 1", meshID, ref).Scan(&ids).Error; err != nil {
			return "", err
		}
	}
	if len(ids) == 0 {
		if err := db.WithContext(ctx).Raw("SELECT id FROM "+db.Table("topic")+" WHERE mesh_id = ? AND name = ? AND archived_at IS NULL LIMIT 1", meshID, ref).Scan(&ids).Error; err != nil {
			return "", err
		}
	}
	if len(ids) == 0 {
		return "", newError(protocol.CodeTopicNotFound, fmt.Sprintf("topic %q not found", ref))
	}
	return ids[0], nil
}

// TopicJoin adds the caller's member to a topic (no reply on success).
func (m *MessagingService) TopicJoin(ctx context.Context, c *Conn, ref, role string) error {
	id, err := m.resolveTopic(ctx, c.MeshID, ref)
	if err != nil {
		return err
	}
	if role != "lead" && role != "observer" {
		role = "member"
	}
	defer m.forgetTopics(c.MemberID)
	return m.joinTopicTx(m.queue.db.WithContext(ctx), id, c.MemberID, role)
}

// TopicLeave removes the caller's member from a topic.
func (m *MessagingService) TopicLeave(ctx context.Context, c *Conn, ref string) error {
	id, err := m.resolveTopic(ctx, c.MeshID, ref)
	if err != nil {
		return err
	}
	db := m.queue.db
	defer m.forgetTopics(c.MemberID)
	return db.WithContext(ctx).Exec("DELETE FROM "+db.Table("topic_member")+" WHERE topic_id = ? AND member_id = ?", id, c.MemberID).Error
}

// MessageStatus answers message_status (02 §7.2).
func (m *MessagingService) MessageStatus(ctx context.Context, c *Conn, id string) (protocol.MessageStatusResult, error) {
	if len(id) < 8 || len(id) > 32 || !isBase62(id) {
		return protocol.MessageStatusResult{}, newError(protocol.CodeInvalidArgument, fmt.Sprintf("messageId must be 8-32 base62 chars (got %d)", len(id)))
	}
	rows, err := m.queue.Lookup(ctx, c.MeshID, id)
	if err != nil {
		return protocol.MessageStatusResult{}, err
	}
	switch len(rows) {
	case 0:
		return protocol.MessageStatusResult{}, newError(protocol.CodeNotFound, "message not found")
	case 2:
		return protocol.MessageStatusResult{}, newError(protocol.CodeAmbiguousPrefix, "prefix matched 2 messages — use a longer id")
	}
	row := rows[0]
	res := protocol.MessageStatusResult{Type: "message_status_result", MessageID: id, TargetSpec: row.TargetSpec, Delivered: row.DeliveredAt != nil, Recipients: []protocol.Recipient{}}
	status := "held"
	if row.DeliveredAt != nil {
		s := protocol.ISO(*row.DeliveredAt)
		res.DeliveredAt = &s
		status = "delivered"
	}
	db := m.queue.db
	var pres []struct {
		SessionPubkey     *string
		PeerPubkey        string
		DisplayName       *string
		MemberDisplayName string
		Groups            models.JSON
	}
	err = db.WithContext(ctx).Raw("SELECT p.session_pubkey, m.peer_pubkey, p.display_name, m.display_name AS member_display_name, p.groups FROM "+db.Table("presence")+
		" p JOIN "+db.Table("member")+" m ON m.id = p.member_id WHERE m.mesh_id = ? AND p.disconnected_at IS NULL ORDER BY p.connected_at", c.MeshID).Scan(&pres).Error
	if err != nil {
		return res, fmt.Errorf("message status recipients: %w", err)
	}
	t := row.TargetSpec
	multicast := t == "*" || strings.HasPrefix(t, "@")
	for _, p := range pres {
		name := p.MemberDisplayName
		if p.DisplayName != nil && *p.DisplayName != "" {
			name = *p.DisplayName
		}
		key := p.PeerPubkey
		if p.SessionPubkey != nil && *p.SessionPubkey != "" {
			key = *p.SessionPubkey
		}
		if multicast {
			if t != "*" && t != "@all" {
				groups, _ := protocol.ParseGroups([]byte(p.Groups))
				if !hasGroup(groups, strings.TrimPrefix(t, "@")) {
					continue
				}
			}
			res.Recipients = append(res.Recipients, protocol.Recipient{Name: name, Pubkey: key, Status: status})
			continue
		}
		if key == t {
			res.Recipients = append(res.Recipients, protocol.Recipient{Name: name, Pubkey: key, Status: status})
			break
		}
	}
	if !multicast && len(res.Recipients) == 0 {
		short := t
		if len(short) > 16 {
			short = short[:16]
		}
		res.Recipients = append(res.Recipients, protocol.Recipient{Name: "unknown", Pubkey: short, Status: "disconnected"})
	}
	return res, nil
}

func isBase62(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
			return false
		}
	}
	return true
}
