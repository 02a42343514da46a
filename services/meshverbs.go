package services

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// MeshVerbs answers the mesh verbs of an authenticated socket that read
// what other features stored: mesh_info, list_bans, topic_members,
// topic_history and topic_mark_read. Topic messages are the rows
// MessagingService.sendTopic writes to mesh.topic_message.
//
// Concurrency: no state of its own; every call is independent queries
// plus a snapshot of the presence registry (PresenceService locks it).
// The counters are set at wiring and never change.
type MeshVerbs struct {
	db       *models.DB
	presence *PresenceService
	now      func() time.Time
	counters MeshInfoCounters
}

// MemoryCounter counts a mesh's live memories for mesh_info.
type MemoryCounter interface {
	CountMemories(ctx context.Context, meshID string) (int, error)
}

// TaskCounter counts a mesh's tasks by status for mesh_info.
type TaskCounter interface {
	CountTasks(ctx context.Context, meshID string) (protocol.TaskCounts, error)
}

// MeshInfoCounters are the counts of features that live in other services.
// A nil counter is a feature meshbroker does not store yet: its count is
// zero, which is what the broker holds, not an estimate.
type MeshInfoCounters struct {
	Memories MemoryCounter
	Tasks    TaskCounter
}

// NewMeshVerbs makes the service.
func NewMeshVerbs(db *models.DB, presence *PresenceService, now func() time.Time, counters MeshInfoCounters) *MeshVerbs {
	return &MeshVerbs{db: db, presence: presence, now: now, counters: counters}
}

// MeshInfo answers mesh_info: the live peers and their groups, the state
// keys, streams and stored counts of the caller's mesh.
func (v *MeshVerbs) MeshInfo(ctx context.Context, c *Conn) (protocol.MeshInfoResult, error) {
	peers, err := v.presence.ListPeers(ctx, c)
	if err != nil {
		return protocol.MeshInfoResult{}, err
	}
	res := protocol.MeshInfoResult{Type: "mesh_info_result", Mesh: c.MeshID, Peers: len(peers), Groups: []string{},
		Tables: []string{}, Collections: []string{}, YourGroups: []protocol.Group{}}
	seen := map[string]bool{}
	for _, p := range peers {
		for _, g := range p.Groups {
			if name := "@" + g.Name; !seen[name] {
				seen[name] = true
				res.Groups = append(res.Groups, name)
			}
		}
	}
	sort.Strings(res.Groups)
	for _, view := range v.presence.Peers(c.MeshID, nil) {
		if view.Conn == c {
			res.YourName = view.DisplayName
			if view.Groups != nil {
				res.YourGroups = view.Groups
			}
		}
	}
	if res.YourName == "" {
		res.YourName = "unknown"
	}
	db := v.db.WithContext(ctx)
	if err := db.Raw(`SELECT "key" FROM `+v.db.Table("state")+` WHERE mesh_id = ? ORDER BY "key"`, c.MeshID).Scan(&res.StateKeys).Error; err != nil {
		return res, fmt.Errorf("mesh info state keys: %w", err)
	}
	if err := db.Raw("SELECT name FROM "+v.db.Table("stream")+" WHERE mesh_id = ? ORDER BY name", c.MeshID).Scan(&res.Streams).Error; err != nil {
		return res, fmt.Errorf("mesh info streams: %w", err)
	}
	var files int64
	if err := db.Raw("SELECT count(*) FROM "+v.db.Table("file")+" WHERE mesh_id = ? AND deleted_at IS NULL", c.MeshID).Scan(&files).Error; err != nil {
		return res, fmt.Errorf("mesh info files: %w", err)
	}
	res.FileCount = int(files)
	if v.counters.Memories != nil {
		if res.MemoryCount, err = v.counters.Memories.CountMemories(ctx, c.MeshID); err != nil {
			return res, fmt.Errorf("mesh info memories: %w", err)
		}
	}
	if v.counters.Tasks != nil {
		if res.Tasks, err = v.counters.Tasks.CountTasks(ctx, c.MeshID); err != nil {
			return res, fmt.Errorf("mesh info tasks: %w", err)
		}
	}
	if res.StateKeys == nil {
		res.StateKeys = []string{}
	}
	if res.Streams == nil {
		res.Streams = []string{}
	}
	return res, nil
}

// ListBans answers list_bans: the mesh's revoked members.
func (v *MeshVerbs) ListBans(ctx context.Context, c *Conn) ([]protocol.BanEntry, error) {
	var rows []struct {
		DisplayName string
		PeerPubkey  string
		RevokedAt   time.Time
	}
	if err := v.db.WithContext(ctx).Raw("SELECT display_name, peer_pubkey, revoked_at FROM "+v.db.Table("member")+
		" WHERE mesh_id = ? AND revoked_at IS NOT NULL ORDER BY revoked_at, id", c.MeshID).Scan(&rows).Error; err != nil {
		return nil, fmt.Errorf("list bans: %w", err)
	}
	out := make([]protocol.BanEntry, 0, len(rows))
	for _, r := range rows {
		out = append(out, protocol.BanEntry{Name: r.DisplayName, Pubkey: r.PeerPubkey, RevokedAt: protocol.ISO(r.RevokedAt)})
	}
	return out, nil
}

type resolvedTopic struct {
	ID         string
	Visibility string
}

// topicFor resolves a topic by id or name within the caller's mesh. A
// private or dm topic is only visible to its members: to anyone else it
// does not exist.
func (v *MeshVerbs) topicFor(ctx context.Context, c *Conn, ref string) (resolvedTopic, error) {
	if ref == "" {
		return resolvedTopic{}, newError(protocol.CodeInvalidArgument, "topic must be a non-empty string")
	}
	db, topic := v.db.WithContext(ctx), v.db.Table("topic")
	var rows []resolvedTopic
	if topicIDPattern.MatchString(ref) {
		if err := db.Raw("SELECT id, visibility FROM "+topic+" WHERE mesh_id = ? AND id = ? LIMIT 1", c.MeshID, ref).Scan(&rows).Error; err != nil {
			return resolvedTopic{}, fmt.Errorf("resolve topic: %w", err)
		}
	}
	if len(rows) == 0 {
		if err := db.Raw("SELECT id, visibility FROM "+topic+" WHERE mesh_id = ? AND name = ? AND archived_at IS NULL LIMIT 1", c.MeshID, strings.TrimPrefix(ref, "#")).Scan(&rows).Error; err != nil {
			return resolvedTopic{}, fmt.Errorf("resolve topic: %w", err)
		}
	}
	notFound := newError(protocol.CodeTopicNotFound, fmt.Sprintf("topic %q not found", ref))
	if len(rows) == 0 {
		return resolvedTopic{}, notFound
	}
	t := rows[0]
	if t.Visibility != "public" {
		var n int64
		if err := db.Raw("SELECT count(*) FROM "+v.db.Table("topic_member")+" WHERE topic_id = ? AND member_id = ?", t.ID, c.MemberID).Scan(&n).Error; err != nil {
			return resolvedTopic{}, fmt.Errorf("topic membership: %w", err)
		}
		if n == 0 {
			return resolvedTopic{}, notFound
		}
	}
	return t, nil
}

// TopicMembers answers topic_members, by display name. Members still
// waiting for their first hello after a v2 claim are not listed.
func (v *MeshVerbs) TopicMembers(ctx context.Context, c *Conn, ref string) ([]protocol.TopicMemberEntry, error) {
	t, err := v.topicFor(ctx, c, ref)
	if err != nil {
		return nil, err
	}
	var rows []struct {
		MemberID    string
		PeerPubkey  string
		DisplayName string
		Role        string
		JoinedAt    time.Time
		LastReadAt  *time.Time
	}
	if err := v.db.WithContext(ctx).Raw("SELECT tm.member_id, m.peer_pubkey, m.display_name, tm.role, tm.joined_at, tm.last_read_at FROM "+v.db.Table("topic_member")+
		" tm JOIN "+v.db.Table("member")+" m ON m.id = tm.member_id WHERE tm.topic_id = ? AND m.revoked_at IS NULL AND "+boundMemberSQL+
		" ORDER BY m.display_name, m.id", t.ID).Scan(&rows).Error; err != nil {
		return nil, fmt.Errorf("topic members: %w", err)
	}
	out := make([]protocol.TopicMemberEntry, 0, len(rows))
	for _, r := range rows {
		e := protocol.TopicMemberEntry{MemberID: r.MemberID, Pubkey: r.PeerPubkey, DisplayName: r.DisplayName, Role: r.Role, JoinedAt: protocol.ISO(r.JoinedAt)}
		if r.LastReadAt != nil {
			s := protocol.ISO(*r.LastReadAt)
			e.LastReadAt = &s
		}
		out = append(out, e)
	}
	return out, nil
}

// Topic history page sizes: the reference's default and cap.
const (
	topicHistoryDefault = 50
	topicHistoryMax     = 200
)

// TopicHistory answers topic_history: stored messages newest first, at
// most limit (default 50, at most 200), strictly older than beforeId when
// given. Paging is by (created_at, id), so messages sharing a timestamp
// are neither skipped nor repeated across pages.
func (v *MeshVerbs) TopicHistory(ctx context.Context, c *Conn, ref string, limit int, beforeID string) ([]protocol.TopicHistoryEntry, error) {
	t, err := v.topicFor(ctx, c, ref)
	if err != nil {
		return nil, err
	}
	if limit <= 0 {
		limit = topicHistoryDefault
	}
	limit = min(limit, topicHistoryMax)
	tmsg := v.db.Table("topic_message")
	db := v.db.WithContext(ctx)
	where, args := "tm.topic_id = ?", []any{t.ID}
	if beforeID != "" {
		var cursor []struct {
			ID        string
			CreatedAt time.Time
		}
		if err := db.Raw("SELECT id, created_at FROM "+tmsg+" WHERE id = ? AND topic_id = ?", beforeID, t.ID).Scan(&cursor).Error; err != nil {
			return nil, fmt.Errorf("topic history cursor: %w", err)
		}
		if len(cursor) == 0 {
			return nil, newError(protocol.CodeInvalidArgument, "beforeId is not a message of this topic")
		}
		where += " AND (tm.created_at < ? OR (tm.created_at = ? AND tm.id < ?))"
		args = append(args, cursor[0].CreatedAt, cursor[0].CreatedAt, cursor[0].ID)
	}
	var rows []struct {
		ID                  string
		SenderMemberID      string
		SenderSessionPubkey *string
		PeerPubkey          string
		DisplayName         string
		Nonce               string
		Ciphertext          string
		BodyVersion         int
		ReplyToID           *string
		CreatedAt           time.Time
	}
	args = append(args, limit)
	if err := db.Raw("SELECT tm.id, tm.sender_member_id, tm.sender_session_pubkey, m.peer_pubkey, m.display_name, tm.nonce, tm.ciphertext, tm.body_version, tm.reply_to_id, tm.created_at FROM "+
		tmsg+" tm JOIN "+v.db.Table("member")+" m ON m.id = tm.sender_member_id WHERE "+where+" ORDER BY tm.created_at DESC, tm.id DESC LIMIT ?", args...).Scan(&rows).Error; err != nil {
		return nil, fmt.Errorf("topic history: %w", err)
	}
	out := make([]protocol.TopicHistoryEntry, 0, len(rows))
	for _, r := range rows {
		e := protocol.TopicHistoryEntry{ID: r.ID, SenderPubkey: r.PeerPubkey, SenderMemberID: r.SenderMemberID, SenderName: r.DisplayName,
			Nonce: r.Nonce, Ciphertext: r.Ciphertext, BodyVersion: r.BodyVersion, ReplyToID: r.ReplyToID, CreatedAt: protocol.ISO(r.CreatedAt)}
		if r.SenderSessionPubkey != nil && *r.SenderSessionPubkey != "" {
			e.SenderPubkey = *r.SenderSessionPubkey
		}
		out = append(out, e)
	}
	return out, nil
}

// TopicMarkRead answers topic_mark_read: the caller's membership of the
// topic is marked read now. Not a member: nothing to mark.
func (v *MeshVerbs) TopicMarkRead(ctx context.Context, c *Conn, ref string) error {
	t, err := v.topicFor(ctx, c, ref)
	if err != nil {
		return err
	}
	if err := v.db.WithContext(ctx).Exec("UPDATE "+v.db.Table("topic_member")+" SET last_read_at = ? WHERE topic_id = ? AND member_id = ?",
		v.now().UTC(), t.ID, c.MemberID).Error; err != nil {
		return fmt.Errorf("topic mark read: %w", err)
	}
	return nil
}
