package toolbox

import (
	"context"
	"encoding/json"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// contextSearchLimit is the reference's: get_context returns at most 20.
const contextSearchLimit = 20

// ShareContext stores the caller's working context (one row per member,
// replaced on each share) and tells the mesh's other peers, as the
// reference does, with a state_change.
func (t *Toolbox) ShareContext(ctx context.Context, c Caller, f *protocol.ShareContext) (string, error) {
	summary, err := required("summary", f.Summary, t.limits.MaxItemBytes)
	if err != nil {
		return "", err
	}
	files, err := t.list("filesRead", f.FilesRead)
	if err != nil {
		return "", err
	}
	findings, err := t.list("keyFindings", f.KeyFindings)
	if err != nil {
		return "", err
	}
	tags, err := t.list("tags", f.Tags)
	if err != nil {
		return "", err
	}
	s := t.store
	now := t.now().UTC()
	id := models.NewID()
	// One statement, so two shares racing for one member cannot both insert.
	q := `INSERT INTO ` + s.table("context") + ` (id, mesh_id, member_id, presence_id, peer_name, summary, files_read, key_findings, tags, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ` + s.arrayIn() + `, ` + s.arrayIn() + `, ` + s.arrayIn() + `, ?)
		ON CONFLICT (mesh_id, member_id) DO UPDATE SET presence_id = excluded.presence_id, peer_name = excluded.peer_name,
			summary = excluded.summary, files_read = excluded.files_read, key_findings = excluded.key_findings,
			tags = excluded.tags, updated_at = excluded.updated_at
		RETURNING id`
	var got []struct{ ID string }
	if err := s.raw(ctx, &got, q, id, c.MeshID, c.MemberID, c.PresenceID, strPtr(c.DisplayName), summary,
		arrayArg(files), arrayArg(findings), arrayArg(tags), now); err != nil {
		return "", err
	}
	if len(got) == 1 {
		id = got[0].ID
	}
	t.audit.Record(c.MeshID, "context_shared", c.MemberID, c.DisplayName, map[string]any{"contextId": id, "summaryBytes": len(summary), "files": len(files), "findings": len(findings)})
	name := nameOr(strPtr(c.DisplayName))
	value, _ := json.Marshal(summary)
	// As the reference: the other peers see the summary as a state change.
	t.notify.NotifyMesh(c.MeshID, c.PresenceID, protocol.StateChange{Type: "state_change", Key: "_context:" + name, Value: value, UpdatedBy: name})
	return id, nil
}

type contextRow struct {
	PeerName    *string
	Summary     string
	FilesRead   string
	KeyFindings string
	Tags        string
	UpdatedAt   time.Time
}

// GetContext finds the mesh's contexts whose summary contains query
// (case-insensitively) or that carry it as a tag, newest first.
func (t *Toolbox) GetContext(ctx context.Context, c Caller, query string) ([]protocol.ContextView, error) {
	if len(query) > t.limits.MaxItemBytes {
		return nil, limit("query is %d bytes, more than the %d allowed", len(query), t.limits.MaxItemBytes)
	}
	s := t.store
	var rows []contextRow
	if err := s.raw(ctx, &rows, `SELECT peer_name, summary, `+s.arrayOut("files_read", "files_read")+`, `+s.arrayOut("key_findings", "key_findings")+`, `+s.arrayOut("tags", "tags")+`, updated_at
		FROM `+s.table("context")+` WHERE mesh_id = ? AND (`+s.ilike("summary")+` OR `+s.arrayHas("context", "tags")+`)
		ORDER BY updated_at DESC LIMIT ?`, c.MeshID, containsPattern(query), query, contextSearchLimit); err != nil {
		return nil, err
	}
	out := make([]protocol.ContextView, 0, len(rows))
	for _, r := range rows {
		files, findings := decodeList(r.FilesRead), decodeList(r.KeyFindings)
		out = append(out, protocol.ContextView{PeerName: nameOr(r.PeerName), Summary: r.Summary, FilesRead: &files, KeyFindings: &findings,
			Tags: decodeList(r.Tags), UpdatedAt: iso(r.UpdatedAt)})
	}
	return out, nil
}

// ListContexts lists every context of the mesh, newest first.
func (t *Toolbox) ListContexts(ctx context.Context, c Caller) ([]protocol.ContextView, error) {
	s := t.store
	var rows []contextRow
	if err := s.raw(ctx, &rows, `SELECT peer_name, summary, `+s.arrayOut("tags", "tags")+`, updated_at
		FROM `+s.table("context")+` WHERE mesh_id = ? ORDER BY updated_at DESC`, c.MeshID); err != nil {
		return nil, err
	}
	out := make([]protocol.ContextView, 0, len(rows))
	for _, r := range rows {
		out = append(out, protocol.ContextView{PeerName: nameOr(r.PeerName), Summary: r.Summary, Tags: decodeList(r.Tags), UpdatedAt: iso(r.UpdatedAt)})
	}
	return out, nil
}
