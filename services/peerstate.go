package services

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// peer_state (01 §9): what a member's presentation looked like when its
// last socket closed, restored on its next member hello.

type peerStateRow struct {
	groups      []protocol.Group
	profile     map[string]json.RawMessage
	visible     *bool
	lastSummary string
	lastSeenAt  *time.Time
	stats       json.RawMessage
}

// peerStateSnapshot is copied under mu when a socket closes and saved
// afterwards without the lock.
type peerStateSnapshot struct {
	meshID, memberID, displayName string
	groups                        []protocol.Group
	profile                       map[string]json.RawMessage
	visible                       bool
	stats                         json.RawMessage
}

func (p *PresenceService) peerStateLocked(c *Conn) peerStateSnapshot {
	prof := make(map[string]json.RawMessage, len(c.profile))
	for k, v := range c.profile {
		prof[k] = v
	}
	return peerStateSnapshot{meshID: c.MeshID, memberID: c.MemberID, displayName: c.displayName, groups: c.groups, profile: prof, visible: c.visible, stats: c.stats}
}

func (p *PresenceService) restorePeerState(ctx context.Context, meshID, memberID string) (*peerStateRow, error) {
	var rows []struct {
		Groups          models.JSON
		Profile         models.JSON
		Visible         *bool
		LastSummary     *string
		LastSeenAt      *time.Time
		CumulativeStats models.JSON
	}
	err := p.db.WithContext(ctx).Raw("SELECT groups, profile, visible, last_summary, last_seen_at, cumulative_stats FROM "+p.db.Table("peer_state")+
		" WHERE mesh_id = ? AND member_id = ? LIMIT 1", meshID, memberID).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("restore peer state: %w", err)
	}
	if len(rows) == 0 {
		return nil, nil
	}
	r := rows[0]
	out := &peerStateRow{visible: r.Visible, lastSeenAt: r.LastSeenAt, stats: json.RawMessage(r.CumulativeStats)}
	out.groups, _ = protocol.ParseGroups(json.RawMessage(r.Groups))
	if out.groups == nil {
		out.groups = []protocol.Group{}
	}
	out.profile = map[string]json.RawMessage{}
	if len(r.Profile) > 0 {
		_ = json.Unmarshal(r.Profile, &out.profile)
	}
	if r.LastSummary != nil {
		out.lastSummary = *r.LastSummary
	}
	if out.lastSeenAt != nil {
		t := out.lastSeenAt.UTC()
		out.lastSeenAt = &t
	}
	return out, nil
}

var statKeys = []string{"messagesIn", "messagesOut", "toolCalls", "errors"}

// savePeerState upserts the member's row on every close that enters grace.
// Errors are logged: a lost save costs a restored profile, not a message.
// A save waits for one of the bgSlots for as long as it takes, except once
// shutdown has begun: then it gives up, so a database that hangs during a
// mass disconnect holds shutdown (which waits for these saves) for the
// running saves' ten seconds, not ten seconds per slot-full of sockets.
func (p *PresenceService) savePeerState(s peerStateSnapshot) {
	select {
	case p.bgSlots <- struct{}{}:
		defer func() { <-p.bgSlots }()
	case <-p.stopping:
		p.log.Warn("save peer state", "mesh", s.meshID, "member", s.memberID, "err", "broker stopping before a writer was free")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.savePeerStateCtx(ctx, s); err != nil {
		p.log.Warn("save peer state", "mesh", s.meshID, "member", s.memberID, "err", err)
	}
}

// savePeerStateCtx reads the running totals, upserts the row and copies a
// live summary, in one transaction. On Postgres the commit does not wait
// for its WAL flush (synchronous_commit off, this transaction only): a crash
// may lose the last fraction of a second of these saves, which costs a
// restored profile, never a message, and a mass disconnect no longer queues
// a thousand fsyncs in front of the reconnects.
func (p *PresenceService) savePeerStateCtx(ctx context.Context, s peerStateSnapshot) error {
	return p.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if p.db.IsPostgres() {
			if err := tx.Exec("SET LOCAL synchronous_commit = off").Error; err != nil {
				return fmt.Errorf("relax commit: %w", err)
			}
		}
		return p.savePeerStateTx(tx, s)
	})
}

func (p *PresenceService) savePeerStateTx(tx *gorm.DB, s peerStateSnapshot) error {
	tbl := p.db.Table("peer_state")
	// Two sessions of one member closing together must not both add to the
	// same old totals, nor both find no row and insert: the member's saves
	// take turns from this read to the commit (on SQLite the transaction
	// holds the database's write lock already).
	if p.db.IsPostgres() {
		if err := tx.Exec("SELECT pg_advisory_xact_lock(?)", advisoryLockKey("peer_state:"+s.meshID+"|"+s.memberID)).Error; err != nil {
			return fmt.Errorf("lock peer state: %w", err)
		}
	}
	var prev []struct{ CumulativeStats models.JSON }
	if err := tx.Raw("SELECT cumulative_stats FROM "+tbl+" WHERE mesh_id = ? AND member_id = ?", s.meshID, s.memberID).Scan(&prev).Error; err != nil {
		return fmt.Errorf("read peer state: %w", err)
	}
	totals := map[string]float64{}
	if len(prev) > 0 && len(prev[0].CumulativeStats) > 0 {
		_ = json.Unmarshal(prev[0].CumulativeStats, &totals)
	}
	var cur map[string]any
	_ = json.Unmarshal(s.stats, &cur)
	stats := make(map[string]float64, 4)
	for _, k := range statKeys {
		n, _ := cur[k].(float64)
		stats[k] = totals[k] + n
	}
	statsJSON, _ := json.Marshal(stats)
	groups, _ := json.Marshal(s.groups)
	profile, _ := json.Marshal(s.profile)
	now := p.now().UTC()
	err := tx.Exec("INSERT INTO "+tbl+
		" (id, mesh_id, member_id, groups, profile, visible, last_display_name, cumulative_stats, last_seen_at, created_at, updated_at)"+
		" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"+
		" ON CONFLICT (mesh_id, member_id) DO UPDATE SET groups = excluded.groups, profile = excluded.profile, visible = excluded.visible,"+
		" last_display_name = excluded.last_display_name, cumulative_stats = excluded.cumulative_stats, last_seen_at = excluded.last_seen_at, updated_at = excluded.updated_at",
		models.NewID(), s.meshID, s.memberID, models.JSON(groups), models.JSON(profile), s.visible, s.displayName, models.JSON(statsJSON), now, now, now).Error
	if err != nil {
		return fmt.Errorf("upsert peer state: %w", err)
	}
	// Any live row of the member with a summary, as the reference reads it
	// (rows without one are skipped so a NULL does not hide a summary).
	var summaries []struct{ Summary *string }
	if err := tx.Raw("SELECT summary FROM "+p.db.Table("presence")+" WHERE member_id = ? AND disconnected_at IS NULL AND summary IS NOT NULL AND summary <> '' LIMIT 1", s.memberID).Scan(&summaries).Error; err != nil {
		return fmt.Errorf("read summary for peer state: %w", err)
	}
	if len(summaries) > 0 && summaries[0].Summary != nil {
		if err := tx.Exec("UPDATE "+tbl+" SET last_summary = ?, updated_at = ? WHERE mesh_id = ? AND member_id = ?", *summaries[0].Summary, now, s.meshID, s.memberID).Error; err != nil {
			return fmt.Errorf("save last summary: %w", err)
		}
	}
	return nil
}
