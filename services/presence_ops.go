package services

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// Presence messages of 03 §6 and moderation: everything a connected peer
// says about itself, and what an owner or admin can do to others.

// SetSummary stores the summary on the presence row (03 §6.2).
func (p *PresenceService) SetSummary(ctx context.Context, c *Conn, summary string) error {
	if err := p.db.WithContext(ctx).Exec("UPDATE "+p.db.Table("presence")+" SET summary = ? WHERE id = ?", summary, c.PresenceID).Error; err != nil {
		return fmt.Errorf("set summary: %w", err)
	}
	return nil
}

// SetStats replaces the connection's stats (03 §6.3); only peer_state sees them.
func (p *PresenceService) SetStats(c *Conn, stats json.RawMessage) {
	if len(stats) == 0 || stats[0] != '{' {
		stats = json.RawMessage("{}")
	}
	p.mu.Lock()
	c.stats = stats
	p.markDirtyLocked(c)
	p.mu.Unlock()
}

// SetVisible hides or shows the presence and tells every other socket of
// the mesh (03 §6.4).
func (p *PresenceService) SetVisible(c *Conn, visible bool) {
	p.mu.Lock()
	c.visible = visible
	name := c.displayName
	p.markDirtyLocked(c)
	p.mu.Unlock()
	event := "peer_hidden"
	if visible {
		event = "peer_visible"
	}
	f := protocol.MustEncode(protocol.NewSystemPush(c.MeshID, event, "low", protocol.PeerEvent{Name: name, Pubkey: c.RoutingPubkey()}, protocol.ISO(p.now())))
	p.Broadcast(c.MeshID, f, func(v PeerView) bool { return v.Conn != c })
}

// profileKeys are the set_profile fields that merge into the profile.
var profileKeys = []string{"avatar", "title", "bio", "capabilities"}

// SetProfile merges the present keys of a set_profile frame (03 §6.5).
func (p *PresenceService) SetProfile(c *Conn, frame map[string]json.RawMessage) {
	p.mu.Lock()
	next := make(map[string]json.RawMessage, len(c.profile)+len(profileKeys))
	for k, v := range c.profile {
		next[k] = v
	}
	for _, k := range profileKeys {
		if v, ok := frame[k]; ok {
			next[k] = v
		}
	}
	c.profile = next
	p.markDirtyLocked(c)
	p.mu.Unlock()
}

// JoinGroup adds or replaces a group of this connection (02 §9). The new
// list is published in memory only once the row holds it: a failed save
// changes nothing, so the next join or leave starts from what is stored.
func (p *PresenceService) JoinGroup(ctx context.Context, c *Conn, g protocol.Group) error {
	return p.updateGroups(ctx, c, func(groups []protocol.Group) []protocol.Group {
		next := make([]protocol.Group, 0, len(groups)+1)
		replaced := false
		for _, e := range groups {
			if e.Name == g.Name {
				if !replaced {
					next = append(next, g)
					replaced = true
				}
				continue
			}
			next = append(next, e)
		}
		if !replaced {
			next = append(next, g)
		}
		return next
	})
}

// LeaveGroup removes every group of that name from this connection, on
// the same terms as JoinGroup.
func (p *PresenceService) LeaveGroup(ctx context.Context, c *Conn, name string) error {
	return p.updateGroups(ctx, c, func(groups []protocol.Group) []protocol.Group {
		next := make([]protocol.Group, 0, len(groups))
		for _, e := range groups {
			if e.Name != name {
				next = append(next, e)
			}
		}
		return next
	})
}

// updateGroups computes the next group list from the current one, saves
// it, and only then publishes it.
func (p *PresenceService) updateGroups(ctx context.Context, c *Conn, change func([]protocol.Group) []protocol.Group) error {
	c.groupsWrite.Lock()
	defer c.groupsWrite.Unlock()
	p.mu.RLock()
	next := change(c.groups)
	p.mu.RUnlock()
	if err := p.saveGroups(ctx, c, next); err != nil {
		return err
	}
	p.mu.Lock()
	c.groups = next
	p.mu.Unlock()
	return nil
}

func (p *PresenceService) saveGroups(ctx context.Context, c *Conn, groups []protocol.Group) error {
	b, err := json.Marshal(groups)
	if err != nil {
		return fmt.Errorf("encode groups: %w", err)
	}
	if err := p.db.WithContext(ctx).Exec("UPDATE "+p.db.Table("presence")+" SET groups = ? WHERE id = ?", models.JSON(b), c.PresenceID).Error; err != nil {
		return fmt.Errorf("save groups: %w", err)
	}
	return nil
}

// Groups returns the connection's current groups.
func (p *PresenceService) Groups(c *Conn) []protocol.Group {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return c.groups
}

// DisplayName returns the connection's effective display name.
func (p *PresenceService) DisplayName(c *Conn) string {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return c.displayName
}

// ListPeers answers list_peers (03 §6.6): active presence rows of the mesh
// from the database (other instances' included), decorated with what this
// process knows in memory, hidden peers removed for other members.
func (p *PresenceService) ListPeers(ctx context.Context, caller *Conn) ([]protocol.PeerInfo, error) {
	var rows []struct {
		ID                string
		SessionPubkey     *string
		PeerPubkey        string
		DisplayName       *string
		MemberDisplayName string
		Status            string
		Summary           *string
		Groups            models.JSON
		SessionID         string
		ConnectedAt       time.Time
		Cwd               string
		Role              *string
	}
	pr, mem := p.db.Table("presence"), p.db.Table("member")
	err := p.db.WithContext(ctx).Raw("SELECT p.id, p.session_pubkey, m.peer_pubkey, p.display_name, m.display_name AS member_display_name, p.status, p.summary,"+
		" p.groups, p.session_id, p.connected_at, p.cwd, p.role FROM "+pr+" p JOIN "+mem+" m ON m.id = p.member_id"+
		" WHERE m.mesh_id = ? AND p.disconnected_at IS NULL ORDER BY p.connected_at, p.id", caller.MeshID).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("list peers: %w", err)
	}
	peers := make([]protocol.PeerInfo, 0, len(rows))
	p.mu.RLock()
	defer p.mu.RUnlock()
	for _, r := range rows {
		c := p.conns[r.ID]
		if c != nil && !c.visible && c.MemberPubkey != caller.MemberPubkey {
			continue
		}
		e := protocol.PeerInfo{
			Pubkey: r.PeerPubkey, MemberPubkey: r.PeerPubkey, DisplayName: r.MemberDisplayName, Status: r.Status,
			Summary: r.Summary, SessionID: r.SessionID, ConnectedAt: protocol.ISO(r.ConnectedAt), Cwd: r.Cwd, PeerRole: "session",
		}
		if r.SessionPubkey != nil && *r.SessionPubkey != "" {
			e.Pubkey = *r.SessionPubkey
		}
		if r.DisplayName != nil && *r.DisplayName != "" {
			e.DisplayName = *r.DisplayName
		}
		e.Groups, _ = protocol.ParseGroups(json.RawMessage(r.Groups))
		if e.Groups == nil {
			e.Groups = []protocol.Group{}
		}
		if r.Role != nil {
			e.PeerRole = *r.Role
		}
		if c != nil {
			e.Cwd = c.cwd
			e.Hostname, e.PeerType, e.Channel, e.Model = c.hostname, c.peerType, c.channel, c.model
			e.Stats = c.stats
			vis := c.visible
			e.Visible = &vis
			if len(c.profile) > 0 {
				e.Profile, _ = json.Marshal(c.profile)
			}
			if !c.online {
				e.InGrace, e.LeaseExpiresAt = true, protocol.ISO(c.leaseUntil)
			}
		}
		peers = append(peers, e)
	}
	// Peers in grace go last (otherwise in connection order): a client that
	// resolves a name to the first match then picks a live socket over one
	// that closed seconds ago, where a message would only be held.
	sort.SliceStable(peers, func(i, j int) bool { return !peers[i].InGrace && peers[j].InGrace })
	return peers, nil
}

// ModerationRequest is disconnect or kick with its one selector.
type ModerationRequest struct {
	Kick   bool
	Target string
	Stale  *time.Duration
	All    bool
}

// ModerationResult names who was closed and, for kick, which control-plane
// sockets were left alone.
type ModerationResult struct {
	Affected            []string
	SkippedControlPlane []string
}

// Moderate runs disconnect or kick (03 §6.7). Every removed presence goes
// through the one eviction path (R1, H2), without peer_left.
func (p *PresenceService) Moderate(ctx context.Context, caller *Conn, req ModerationRequest) (ModerationResult, error) {
	verb := "disconnected"
	if req.Kick {
		verb = "kicked"
	}
	ok, err := p.members.IsModerator(ctx, caller.MeshID, caller.MemberID)
	if err != nil {
		return ModerationResult{}, err
	}
	if !ok {
		return ModerationResult{}, newError(protocol.CodeForbidden, "only owner or admin can "+verb)
	}
	closeWith := protocol.CloseDisconnected
	reason := EvictDisconnect
	if req.Kick {
		closeWith, reason = protocol.CloseKicked, EvictKick
	}
	var stale map[string]bool
	if !req.All && req.Stale != nil {
		if req.Kick {
			closeWith = protocol.CloseKickedStale
		} else {
			closeWith = protocol.CloseDisconnectStale
		}
		var ids []string
		if err := p.db.WithContext(ctx).Raw("SELECT p.id FROM "+p.db.Table("presence")+" p JOIN "+p.db.Table("member")+" m ON m.id = p.member_id WHERE m.mesh_id = ? AND p.last_ping_at < ?",
			caller.MeshID, p.now().Add(-*req.Stale).UTC()).Scan(&ids).Error; err != nil {
			return ModerationResult{}, fmt.Errorf("find stale presences: %w", err)
		}
		stale = make(map[string]bool, len(ids))
		for _, id := range ids {
			stale[id] = true
		}
	}
	res := ModerationResult{Affected: []string{}}
	for _, v := range p.Peers(caller.MeshID, nil) {
		c := v.Conn
		switch {
		case req.All:
			if c == caller {
				continue
			}
		case stale != nil:
			if c == caller || !stale[c.PresenceID] {
				continue
			}
		case req.Target != "":
			if v.DisplayName != req.Target && c.MemberPubkey != req.Target && !strings.HasPrefix(c.MemberPubkey, req.Target) {
				continue
			}
		default:
			continue
		}
		name := v.DisplayName
		if name == "" {
			name = c.PresenceID
		}
		if req.Kick && c.Role == RoleControlPlane {
			res.SkippedControlPlane = append(res.SkippedControlPlane, name)
			continue
		}
		if v.Out != nil {
			v.Out.Close(closeWith)
		}
		if p.evict(c, reason, false) {
			res.Affected = append(res.Affected, name)
		}
	}
	p.log.Info("ws "+verb, "presence_id", caller.PresenceID, "count", len(res.Affected), "target", req.Target, "skipped_control_plane", len(res.SkippedControlPlane))
	return res, nil
}

// Ban revokes a member found by display name, pubkey or pubkey prefix and
// closes all its sockets with 4002.
func (p *PresenceService) Ban(ctx context.Context, caller *Conn, target string) (string, error) {
	if target == "" {
		return "", newError(protocol.CodeInvalid, "target required")
	}
	ok, err := p.members.IsModerator(ctx, caller.MeshID, caller.MemberID)
	if err != nil {
		return "", err
	}
	if !ok {
		return "", newError(protocol.CodeForbidden, "only owner or admin can ban")
	}
	var rows []struct {
		ID          string
		DisplayName string
		PeerPubkey  string
	}
	err = p.db.WithContext(ctx).Raw("SELECT id, display_name, peer_pubkey FROM "+p.db.Table("member")+
		" WHERE mesh_id = ? AND revoked_at IS NULL AND (display_name = ? OR peer_pubkey = ? OR substr(peer_pubkey, 1, ?) = ?) LIMIT 1",
		caller.MeshID, target, target, len(target), target).Scan(&rows).Error
	if err != nil {
		return "", fmt.Errorf("find ban target: %w", err)
	}
	if len(rows) == 0 {
		return "", newError(protocol.CodeNotFound, fmt.Sprintf("peer %q not found", target))
	}
	t := rows[0]
	if t.ID == caller.MemberID {
		return "", newError(protocol.CodeInvalid, "cannot ban yourself")
	}
	if err := p.db.WithContext(ctx).Exec("UPDATE "+p.db.Table("member")+" SET revoked_at = ? WHERE id = ?", p.now().UTC(), t.ID).Error; err != nil {
		return "", fmt.Errorf("revoke member: %w", err)
	}
	p.members.Invalidate(caller.MeshID)
	for _, v := range p.ByKey(caller.MeshID, t.PeerPubkey, nil) {
		if v.Conn.MemberPubkey != t.PeerPubkey {
			continue
		}
		if v.Out != nil {
			v.Out.Close(protocol.CloseBanned)
		}
		p.evict(v.Conn, EvictBan, false)
	}
	p.audit.Record(caller.MeshID, "member_banned", caller.MemberID, p.DisplayName(caller), map[string]any{"target": t.DisplayName, "targetPubkey": t.PeerPubkey})
	return t.DisplayName, nil
}

// Unban clears revoked_at of a member found by display name or pubkey.
func (p *PresenceService) Unban(ctx context.Context, caller *Conn, target string) (string, error) {
	if target == "" {
		return "", newError(protocol.CodeInvalid, "target required")
	}
	ok, err := p.members.IsModerator(ctx, caller.MeshID, caller.MemberID)
	if err != nil {
		return "", err
	}
	if !ok {
		return "", newError(protocol.CodeForbidden, "only owner or admin can unban")
	}
	var rows []struct {
		ID          string
		DisplayName string
	}
	err = p.db.WithContext(ctx).Raw("SELECT id, display_name FROM "+p.db.Table("member")+
		" WHERE mesh_id = ? AND revoked_at IS NOT NULL AND (display_name = ? OR peer_pubkey = ?) LIMIT 1", caller.MeshID, target, target).Scan(&rows).Error
	if err != nil {
		return "", fmt.Errorf("find unban target: %w", err)
	}
	if len(rows) == 0 {
		return "", newError(protocol.CodeNotFound, fmt.Sprintf("no banned peer %q", target))
	}
	if err := p.db.WithContext(ctx).Exec("UPDATE "+p.db.Table("member")+" SET revoked_at = NULL WHERE id = ?", rows[0].ID).Error; err != nil {
		return "", fmt.Errorf("unrevoke member: %w", err)
	}
	p.members.Invalidate(caller.MeshID)
	p.audit.Record(caller.MeshID, "member_unbanned", caller.MemberID, p.DisplayName(caller), map[string]any{"target": rows[0].DisplayName})
	return rows[0].DisplayName, nil
}
