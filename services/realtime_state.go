package services

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// Shared state (04 §7): one JSON value per (mesh, key) in mesh.state, that
// any member reads and writes. It does not depend on presence: it survives
// eviction and restarts.

type stateRow struct {
	Key           string
	Value         models.JSON
	UpdatedByName *string
	UpdatedAt     time.Time
}

func (s stateRow) updatedBy() string {
	if s.UpdatedByName == nil {
		return "unknown"
	}
	return *s.UpdatedByName
}

// SetState upserts the key, records a metadata-only audit entry (A3: the
// value's size and SHA-256, never the value) and sends state_change to
// every other presence of the mesh, the setter's sibling sessions
// included. There is never a reply. A missing or null value stores
// nothing, audits nothing and tells nobody, as in the reference, where it
// fails the NOT NULL column silently.
func (r *Realtime) SetState(ctx context.Context, c *Conn, key string, value json.RawMessage) error {
	value = bytes.TrimSpace(value)
	if len(value) == 0 || string(value) == "null" {
		r.log.Debug("ws set_state without a value: ignored", "presence_id", c.PresenceID)
		return nil
	}
	name, ok, err := r.memberName(ctx, c)
	if err != nil {
		return err
	}
	if !ok {
		name = "unknown"
	}
	t := r.db.Table("state")
	var rows []stateRow
	err = r.db.WithContext(ctx).Raw("INSERT INTO "+t+` (id, mesh_id, "key", value, updated_by_presence, updated_by_name, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)`+
		` ON CONFLICT (mesh_id, "key") DO UPDATE SET value = excluded.value, updated_by_presence = excluded.updated_by_presence,`+
		` updated_by_name = excluded.updated_by_name, updated_at = excluded.updated_at RETURNING "key", value, updated_by_name, updated_at`,
		models.NewID(), c.MeshID, key, models.JSON(value), c.PresenceID, name, r.now().UTC().Truncate(time.Millisecond)).Scan(&rows).Error
	if err != nil {
		return fmt.Errorf("set state: %w", err)
	}
	if len(rows) != 1 {
		return fmt.Errorf("set state: upsert returned %d rows", len(rows))
	}
	row := rows[0]
	r.audit.Record(c.MeshID, "state_set", c.MemberID, r.presence.DisplayName(c), stateAuditPayload(key, value))
	f := protocol.MustEncode(protocol.StateChange{Type: "state_change", Key: row.Key, Value: json.RawMessage(row.Value), UpdatedBy: row.updatedBy()})
	r.broadcastOthers(c.MeshID, c.PresenceID, f)
	r.log.Debug("ws set_state", "presence_id", c.PresenceID, "bytes", len(value))
	return nil
}

// stateAuditPayload is the state_set audit payload (A3): the key, and the
// size and SHA-256 of the value's canonical JSON (RFC 8785), so the digest
// does not depend on whitespace or key order.
func stateAuditPayload(key string, value json.RawMessage) map[string]any {
	canon, err := CanonicalJSON(value)
	if err != nil {
		canon = value // deeper than the canonicalizer goes: digest the bytes as sent
	}
	sum := sha256.Sum256(canon)
	return map[string]any{"key": key, "size": len(canon), "sha256": hex.EncodeToString(sum[:])}
}

// GetState reads one key; a miss echoes the key with a null value.
func (r *Realtime) GetState(ctx context.Context, c *Conn, key string) (protocol.StateResult, error) {
	var rows []stateRow
	if err := r.db.WithContext(ctx).Raw(`SELECT "key", value, updated_by_name, updated_at FROM `+r.db.Table("state")+` WHERE mesh_id = ? AND "key" = ? LIMIT 1`, c.MeshID, key).Scan(&rows).Error; err != nil {
		return protocol.StateResult{}, fmt.Errorf("get state: %w", err)
	}
	if len(rows) == 0 {
		return protocol.StateResult{Type: "state_result", Key: key}, nil
	}
	s := rows[0]
	return protocol.StateResult{Type: "state_result", Key: s.Key, Value: json.RawMessage(s.Value), UpdatedBy: s.updatedBy(), UpdatedAt: protocol.ISO(s.UpdatedAt)}, nil
}

// ListState returns every key of the mesh, ordered by key.
func (r *Realtime) ListState(ctx context.Context, c *Conn) ([]protocol.StateEntry, error) {
	var rows []stateRow
	if err := r.db.WithContext(ctx).Raw(`SELECT "key", value, updated_by_name, updated_at FROM `+r.db.Table("state")+` WHERE mesh_id = ? ORDER BY "key"`, c.MeshID).Scan(&rows).Error; err != nil {
		return nil, fmt.Errorf("list state: %w", err)
	}
	out := make([]protocol.StateEntry, len(rows))
	for i, s := range rows {
		out[i] = protocol.StateEntry{Key: s.Key, Value: json.RawMessage(s.Value), UpdatedBy: s.updatedBy(), UpdatedAt: protocol.ISO(s.UpdatedAt)}
	}
	return out, nil
}
