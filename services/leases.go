package services

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// Durable leases (issue 16, decision S2): a broker restart, clean or
// crashed, is invisible to peers that come back inside LEASE_TTL_MS.
//
// Every registry entry (online or in grace) has a meshbroker_lease row next
// to its mesh.presence row. The presence row keeps what it always held
// (session id, session key, pid, groups, status, summary); the lease row
// adds what a silent reattach needs and the reference schema lacks: the
// effective name, the in-memory presentation (visible, profile, stats,
// hostname, peer type, channel, model), the attestation expiry, the lease
// state, and the owning process (owner_node_id, owner_epoch) with a
// lease_generation bumped on every adoption, so a later multi-node broker
// can adopt a dead node's rows with a compare-and-set.
//
// When rows are written:
//   - a fresh hello inserts the lease row in the same statement as the
//     presence row (a data-modifying CTE on Postgres, one transaction on the
//     embedded SQLite), so a lease acked to a client survives kill -9;
//   - every later change (reattach, grace, set_visible, set_profile,
//     set_stats) only marks the entry dirty under the registry lock, and
//     FlushLeases rewrites the dirty rows in one batched upsert per
//     interval: send, push and reattach gain no database round trip. A crash
//     loses at most the last interval of these changes, which costs a
//     presentation detail or the online/grace flag (both restore the same);
//   - removal deletes the row in the statement that marks the presence
//     disconnected (before peer_left goes out would delay the leave behind
//     a database write, letting a fresh hello's join overtake it; so the
//     leave goes first, as in the reference), so an evicted lease is never
//     restored;
//   - HoldForNextProcess (shutdown) flushes and marks the rows held; presence
//     rows stay live (no disconnected_at).
//
// RestoreLeases, run once at start while this process holds the owner lock
// (models.AcquireOwnerLock) and before it listens, adopts every row and
// registers each as an offline lease with a full window from now.
//
// Concurrency: dirty is guarded by PresenceService.mu like the registry.
// A flush copies the dirty entries that are still registered and writes
// them without the lock, as updates only, so a removal deleting its row
// meanwhile needs no coordination: the rewrite finds nothing to update and
// can never resurrect the row. writeMu serializes flushes (the job and
// HoldForNextProcess).
// nodeID and epoch are set by RestoreLeases before the first socket and are
// read-only afterwards.
type leaseStore struct {
	nodeID   string
	epoch    int64
	writeMu  sync.Mutex
	lastBeat time.Time // guarded by writeMu
}

// errShuttingDown refuses a hello that arrives while shutdown hands the
// leases to the next process.
var errShuttingDown = errors.New("broker is shutting down")

// leaseHeartbeat is how often the owning process stamps meshbroker_node.
const leaseHeartbeat = 5 * time.Second

// leaseBatchRows bounds the rows of one upsert (22 parameters a row).
const leaseBatchRows = 200

// leaseColumns are meshbroker_lease's columns in insert order.
var leaseColumns = []string{
	"presence_id", "mesh_id", "member_id", "role", "has_session_pubkey", "session_id", "display_name", "cwd",
	"hostname", "peer_type", "channel", "model", "visible", "profile", "stats", "attestation_expires_at",
	"lease_state", "lease_until", "lease_generation", "owner_node_id", "owner_epoch", "updated_at",
}

// leaseUpdated are the columns a rewrite replaces.
var leaseUpdated = []string{
	"session_id", "display_name", "cwd", "hostname", "peer_type", "channel", "model", "visible", "profile", "stats",
	"attestation_expires_at", "lease_state", "lease_until", "owner_node_id", "owner_epoch", "updated_at",
}

// leaseColumnIndex is each column's position in leaseColumns.
var leaseColumnIndex = func() map[string]int {
	m := make(map[string]int, len(leaseColumns))
	for i, c := range leaseColumns {
		m[c] = i
	}
	return m
}()

// leaseColumnTypes are the Postgres types of the rewritten columns.
var leaseColumnTypes = map[string]string{
	"presence_id": "text", "session_id": "text", "display_name": "text", "cwd": "text", "hostname": "text", "peer_type": "text",
	"channel": "text", "model": "text", "visible": "boolean", "profile": "jsonb", "stats": "jsonb", "attestation_expires_at": "timestamp",
	"lease_state": "text", "lease_until": "timestamp", "owner_node_id": "text", "owner_epoch": "bigint", "updated_at": "timestamp",
}

// Lease states in meshbroker_lease.lease_state.
const (
	leaseOnline = "online"
	leaseGrace  = "grace"
	leaseHeld   = "held" // the owner stopped cleanly and left it to the next process
)

// markDirtyLocked schedules c's lease row for the next flush. mu must be held.
func (p *PresenceService) markDirtyLocked(c *Conn) {
	p.dirty[c.PresenceID] = struct{}{}
}

// leaseValuesLocked is c's lease row as insert parameters. mu must be held
// (or c not yet shared).
func (p *PresenceService) leaseValuesLocked(c *Conn, now time.Time) []any {
	state, until := leaseOnline, any(nil)
	if !c.online {
		state, until = leaseGrace, c.leaseUntil.UTC()
	}
	profile, _ := json.Marshal(c.profile)
	if len(c.profile) == 0 {
		profile = []byte("{}")
	}
	var stats any
	if len(c.stats) > 0 {
		stats = models.JSON(c.stats)
	}
	var attest any
	if !c.attestExpiresAt.IsZero() {
		attest = c.attestExpiresAt.UTC()
	}
	return []any{
		c.PresenceID, c.MeshID, c.MemberID, string(c.Role), c.HasSession, c.sessionID, c.displayName, c.cwd,
		c.hostname, c.peerType, c.channel, c.model, c.visible, models.JSON(profile), stats, attest,
		state, until, int64(0), p.leases.nodeID, p.leases.epoch, now.UTC(),
	}
}

// insertPresenceRows writes a fresh presence row and its lease row as one
// unit: one statement on Postgres, one local transaction on SQLite.
func (p *PresenceService) insertPresenceRows(ctx context.Context, presenceSQL string, presenceArgs []any, c *Conn) error {
	leaseArgs := p.leaseValuesLocked(c, c.ConnectedAt)
	cols := strings.Join(leaseColumns, ", ")
	if p.db.IsPostgres() {
		// The presence insert's RETURNING feeds the lease insert, so the
		// lease row exists exactly when the presence row does.
		// lease row exists exactly when the presence row does. VALUES (not
		// SELECT) so the parameters take the target columns' types.
		q := "WITH pr AS (" + presenceSQL + " RETURNING id) INSERT INTO " + p.db.Table("meshbroker_lease") + " (" + cols + ") VALUES ((SELECT id FROM pr)" +
			strings.Repeat(", ?", len(leaseColumns)-1) + ")"
		return p.db.WithContext(ctx).Exec(q, append(presenceArgs, leaseArgs[1:]...)...).Error
	}
	return p.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec(presenceSQL, presenceArgs...).Error; err != nil {
			return err
		}
		return tx.Exec("INSERT INTO "+p.db.Table("meshbroker_lease")+" ("+cols+") VALUES ("+placeholders(len(leaseColumns))+")", leaseArgs...).Error
	})
}

func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?, ", n), ", ")
}

// endPresenceRows marks presences disconnected and deletes their lease rows
// (removal paths, a hello that failed after its insert). On Postgres it is
// one statement.
func (p *PresenceService) endPresenceRows(ctx context.Context, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	now := p.now().UTC()
	mark := "UPDATE " + p.db.Table("presence") + " SET disconnected_at = ? WHERE id IN ? AND disconnected_at IS NULL"
	drop := "DELETE FROM " + p.db.Table("meshbroker_lease") + " WHERE presence_id IN ?"
	if p.db.IsPostgres() {
		return p.db.WithContext(ctx).Exec("WITH gone AS ("+drop+") "+mark, ids, now, ids).Error
	}
	return p.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec(drop, ids).Error; err != nil {
			return err
		}
		return tx.Exec(mark, now, ids).Error
	})
}

// FlushLeases rewrites the lease rows of entries that changed since the
// last flush, in batches, and stamps this process's heartbeat. Entries that
// left the registry meanwhile are skipped: their removal deleted the row.
// A failed write puts its entries back for the next flush.
func (p *PresenceService) FlushLeases(ctx context.Context) error {
	p.leases.writeMu.Lock()
	defer p.leases.writeMu.Unlock()
	now := p.now()
	p.mu.Lock()
	rows := make([][]any, 0, len(p.dirty))
	for id := range p.dirty {
		if c := p.conns[id]; c != nil {
			rows = append(rows, p.leaseValuesLocked(c, now))
		}
	}
	clear(p.dirty)
	p.mu.Unlock()
	for len(rows) > 0 {
		n := min(len(rows), leaseBatchRows)
		if err := p.rewriteLeases(ctx, rows[:n]); err != nil {
			p.mu.Lock()
			for _, r := range rows {
				p.dirty[r[0].(string)] = struct{}{}
			}
			p.mu.Unlock()
			return fmt.Errorf("flush leases: %w", err)
		}
		rows = rows[n:]
	}
	if now.Sub(p.leases.lastBeat) >= leaseHeartbeat && p.leases.epoch > 0 {
		if err := p.db.WithContext(ctx).Exec("UPDATE "+p.db.Table("meshbroker_node")+" SET heartbeat_at = ? WHERE node_id = ?", now.UTC(), p.leases.nodeID).Error; err != nil {
			return fmt.Errorf("lease heartbeat: %w", err)
		}
		p.leases.lastBeat = now
	}
	return nil
}

// rewriteLeases updates existing lease rows from rows (in leaseColumns
// order). It never inserts: a row that a removal deleted meanwhile stays
// deleted, so removals need no lock against it.
func (p *PresenceService) rewriteLeases(ctx context.Context, rows [][]any) error {
	cols := append([]string{"presence_id"}, leaseUpdated...)
	var b strings.Builder
	b.WriteString("WITH v (" + strings.Join(cols, ", ") + ") AS (VALUES ")
	args := make([]any, 0, len(rows)*len(cols))
	for i, r := range rows {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("(")
		for j, col := range cols {
			if j > 0 {
				b.WriteString(", ")
			}
			b.WriteString("?")
			if p.db.IsPostgres() {
				// VALUES outside an INSERT does not take the target's types.
				b.WriteString("::" + leaseColumnTypes[col])
			}
			args = append(args, r[leaseColumnIndex[col]])
		}
		b.WriteString(")")
	}
	tbl := p.db.Table("meshbroker_lease")
	b.WriteString(") UPDATE " + tbl + " SET ")
	for i, col := range leaseUpdated {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(col + " = v." + col)
	}
	b.WriteString(" FROM v WHERE " + tbl + ".presence_id = v.presence_id")
	if !p.db.IsPostgres() {
		return p.db.WithContext(ctx).Exec(b.String(), args...).Error
	}
	// A rewrite is already allowed to be lost with the last interval of a
	// crash, so it does not wait for its WAL flush either: a reconnect
	// storm's rewrites do not queue fsyncs in front of the sends' commits.
	return p.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec("SET LOCAL synchronous_commit = off").Error; err != nil {
			return err
		}
		return tx.Exec(b.String(), args...).Error
	})
}

// restoredLease is one row of the restore query.
type restoredLease struct {
	PresenceID           string
	MeshID               string
	MemberID             string
	Role                 string
	HasSessionPubkey     bool
	SessionID            string
	DisplayName          string
	Cwd                  string
	Hostname             string
	PeerType             string
	Channel              string
	Model                string
	Visible              bool
	Profile              models.JSON
	Stats                models.JSON
	AttestationExpiresAt *time.Time
	LeaseState           string
	SessionPubkey        *string
	Pid                  int
	Groups               models.JSON
	ConnectedAt          time.Time
	Status               string
	StatusSource         string
	StatusUpdatedAt      time.Time
	PeerPubkey           string
	MemberDisplayName    string
	UserID               *string
	MemberRole           string
	RoleTag              *string
	DefaultGroups        models.JSON
	MessageMode          *string
	RevokedAt            *time.Time
	PeerGrants           models.JSON
	// LeaseUntil is set for a lease that was already in grace when its
	// owner stopped; the owner was last known alive at its clean stop or,
	// after a crash, its last heartbeat.
	LeaseUntil       *time.Time
	OwnerStoppedAt   *time.Time
	OwnerHeartbeatAt *time.Time
}

// restoredWindow is how long a restored lease waits for its peer. A peer
// the stop (or crash) cut off gets the full LEASE_TTL_MS to reconnect; one
// that was already gone keeps only what was left of its own lease, so that a
// client that closed normally (CLEAN_CLOSE_LEASE_MS) or dropped long before
// is not brought back for a full lease by a restart.
func (p *PresenceService) restoredWindow(r *restoredLease) time.Duration {
	window := p.cfg.LeaseTTL
	seen := r.OwnerStoppedAt
	if seen == nil {
		seen = r.OwnerHeartbeatAt
	}
	if r.LeaseUntil != nil && seen != nil {
		if left := r.LeaseUntil.Sub(*seen); left < window {
			window = max(left, 0)
		}
	}
	return window
}

// RestoreLeases registers this process as the owner of the database's
// leases and restores every lease the previous process held (held after a
// clean stop, online or in grace after a crash) as an offline lease: with a
// full window from now, or what was left of it for a lease already in grace
// at the stop (restoredWindow). Call once, while holding the owner lock, before
// the first socket. A database without meshbroker_lease rows (a fresh one,
// or one the reference broker wrote) restores nothing.
func (p *PresenceService) RestoreLeases(ctx context.Context) (int, error) {
	now := p.now()
	if err := p.registerNode(ctx, now); err != nil {
		return 0, err
	}
	var rows []restoredLease
	l, pr, mem := p.db.Table("meshbroker_lease"), p.db.Table("presence"), p.db.Table("member")
	err := p.db.WithContext(ctx).Raw("SELECT l.presence_id, l.mesh_id, l.member_id, l.role, l.has_session_pubkey, l.session_id, l.display_name, l.cwd," +
		" l.hostname, l.peer_type, l.channel, l.model, l.visible, l.profile, l.stats, l.attestation_expires_at, l.lease_state," +
		" p.session_pubkey, p.pid, p.groups, p.connected_at, p.status, p.status_source, p.status_updated_at," +
		" m.peer_pubkey, m.display_name AS member_display_name, m.user_id, m.role AS member_role, m.role_tag, m.default_groups, m.message_mode, m.revoked_at, m.peer_grants," +
		// Both node times, not a COALESCE: SQLite types a column by its
		// declaration, and an expression has none.
		" l.lease_until, n.stopped_at AS owner_stopped_at, n.heartbeat_at AS owner_heartbeat_at" +
		" FROM " + l + " l JOIN " + pr + " p ON p.id = l.presence_id JOIN " + mem + " m ON m.id = p.member_id" +
		" LEFT JOIN " + p.db.Table("meshbroker_node") + " n ON n.node_id = l.owner_node_id ORDER BY p.connected_at, p.id").Scan(&rows).Error
	if err != nil {
		return 0, fmt.Errorf("restore leases: read: %w", err)
	}
	until := now.Add(p.cfg.LeaseTTL)
	err = p.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		// Adopt every row: this process is the only owner (the owner lock).
		// A multi-node broker would add "WHERE owner_node_id = <dead node>".
		if err := tx.Exec("UPDATE "+l+" SET owner_node_id = ?, owner_epoch = ?, lease_generation = lease_generation + 1, lease_state = ?, lease_until = ?, updated_at = ?",
			p.leases.nodeID, p.leases.epoch, leaseGrace, until.UTC(), now.UTC()).Error; err != nil {
			return fmt.Errorf("adopt: %w", err)
		}
		// The rows read as live again (the stale sweeper may have flipped
		// some while they were in grace or while no broker ran), with a ping
		// stamp from now, so list_peers shows them as before.
		for i := range rows {
			if w := p.restoredWindow(&rows[i]); w < p.cfg.LeaseTTL {
				if err := tx.Exec("UPDATE "+l+" SET lease_until = ? WHERE presence_id = ?", now.Add(w).UTC(), rows[i].PresenceID).Error; err != nil {
					return fmt.Errorf("adopt: shorten %s: %w", rows[i].PresenceID, err)
				}
			}
		}
		return tx.Exec("UPDATE "+pr+" SET disconnected_at = NULL, last_ping_at = ? WHERE id IN (SELECT presence_id FROM "+l+")", now.UTC()).Error
	})
	if err != nil {
		return 0, fmt.Errorf("restore leases: %w", err)
	}
	held, crashed := 0, 0
	p.mu.Lock()
	for i := range rows {
		window := p.restoredWindow(&rows[i])
		c := p.restoredConnLocked(&rows[i], now)
		c.leaseUntil = now.Add(window)
		p.addLocked(c)
		p.offline++
		gen := c.leaseGen
		c.leaseTimer = time.AfterFunc(window, func() { p.expire(c, gen, EvictLeaseExpired) })
		if rows[i].LeaseState == leaseHeld {
			held++
		} else {
			crashed++
		}
	}
	p.metrics.OfflineLeases.Set(float64(p.offline))
	p.mu.Unlock()
	for i := range rows {
		r := &rows[i]
		p.status.TrackRestored(r.PresenceID, r.Status, r.StatusSource, r.StatusUpdatedAt)
	}
	// The member rows were read with the leases just now: the checks that
	// follow the reattaches (recheckMember) find them in the directory's
	// cache, as fresh as its TTL allows, instead of a thousand queries
	// racing the reconnect storm.
	p.mu.RLock()
	for _, c := range p.conns {
		if c.member != nil {
			p.members.Remember(c.member, now)
		}
	}
	p.mu.RUnlock()
	if len(rows) > 0 {
		p.log.Info("leases restored", "count", len(rows), "held_at_clean_stop", held, "left_by_crash", crashed,
			"lease_ms", p.cfg.LeaseTTL.Milliseconds(), "node", p.leases.nodeID, "epoch", p.leases.epoch)
	}
	return len(rows), nil
}

// restoredConnLocked builds the offline registry entry of a restored row.
// A member revoked meanwhile keeps its lease without a member row: its next
// hello looks the member up, is refused, and ends the lease (authorizeHello).
func (p *PresenceService) restoredConnLocked(r *restoredLease, now time.Time) *Conn {
	c := &Conn{
		PresenceID: r.PresenceID, MeshID: r.MeshID, MemberID: r.MemberID, MemberPubkey: r.PeerPubkey,
		HasSession: r.HasSessionPubkey, Role: PeerRole(r.Role), ConnectedAt: r.ConnectedAt,
		sessionID: r.SessionID, hasSID: r.SessionID != "", displayName: r.DisplayName, pid: r.Pid, cwd: r.Cwd,
		hostname: r.Hostname, peerType: r.PeerType, channel: r.Channel, model: r.Model, visible: r.Visible,
		profile: map[string]json.RawMessage{}, leaseUntil: now.Add(p.cfg.LeaseTTL), lastPongAt: now,
	}
	if r.SessionPubkey != nil {
		c.SessionPubkey = *r.SessionPubkey
	}
	if len(r.Profile) > 0 {
		_ = json.Unmarshal(r.Profile, &c.profile)
	}
	if len(r.Stats) > 0 && string(r.Stats) != "null" {
		c.stats = json.RawMessage(r.Stats)
	}
	if r.AttestationExpiresAt != nil {
		c.attestExpiresAt = *r.AttestationExpiresAt
	}
	c.groups, _ = protocol.ParseGroups(json.RawMessage(r.Groups))
	if c.groups == nil {
		c.groups = []protocol.Group{}
	}
	if r.RevokedAt == nil {
		c.member = &MemberRow{
			ID: r.MemberID, MeshID: r.MeshID, UserID: r.UserID, PeerPubkey: r.PeerPubkey, DisplayName: r.MemberDisplayName,
			Role: r.MemberRole, RoleTag: r.RoleTag, DefaultGroups: r.DefaultGroups, MessageMode: r.MessageMode, PeerGrants: r.PeerGrants,
		}
	}
	return c
}

// registerNode records this process in meshbroker_node with an epoch one
// above every earlier owner's, and marks earlier owners that never stopped
// cleanly as crashed.
func (p *PresenceService) registerNode(ctx context.Context, now time.Time) error {
	host, _ := os.Hostname()
	nodes := p.db.Table("meshbroker_node")
	return p.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		var last []int64
		if err := tx.Raw("SELECT COALESCE(MAX(epoch), 0) FROM " + nodes).Scan(&last).Error; err != nil {
			return fmt.Errorf("register node: read epoch: %w", err)
		}
		epoch := int64(1)
		if len(last) == 1 {
			epoch = last[0] + 1
		}
		var crashed []string
		if err := tx.Raw("SELECT node_id FROM " + nodes + " WHERE state = 'running'").Scan(&crashed).Error; err != nil {
			return fmt.Errorf("register node: read previous: %w", err)
		}
		if len(crashed) > 0 {
			p.log.Warn("previous broker did not stop cleanly; adopting its leases", "nodes", crashed)
			if err := tx.Exec("UPDATE " + nodes + " SET state = 'crashed', stopped_at = heartbeat_at WHERE state = 'running'").Error; err != nil {
				return fmt.Errorf("register node: mark crashed: %w", err)
			}
		}
		if err := tx.Exec("INSERT INTO "+nodes+" (node_id, epoch, hostname, pid, started_at, heartbeat_at, state) VALUES (?, ?, ?, ?, ?, ?, 'running')",
			p.leases.nodeID, epoch, host, os.Getpid(), now.UTC(), now.UTC()).Error; err != nil {
			return fmt.Errorf("register node: %w", err)
		}
		p.leases.epoch = epoch
		p.leases.lastBeat = now
		return nil
	})
}

// HoldForNextProcess is the lease half of shutdown (S2): after the sockets
// are closed it writes the last changes and marks every lease this process
// owns as held for the next one, instead of ending the presences. Peers
// that reconnect to the next process within the lease reattach silently.
func (p *PresenceService) HoldForNextProcess(ctx context.Context) error {
	p.mu.Lock()
	p.shutdown = true
	p.mu.Unlock()
	if err := p.FlushLeases(ctx); err != nil {
		return err
	}
	now := p.now().UTC()
	err := p.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		// A lease already in grace keeps its lease_until, so the next
		// process gives it only what is left (restoredWindow); the others
		// were cut off by this stop and get a full window there.
		if err := tx.Exec("UPDATE "+p.db.Table("meshbroker_lease")+" SET lease_state = ?, lease_until = CASE WHEN lease_state = ? THEN lease_until ELSE NULL END, updated_at = ? WHERE owner_node_id = ?",
			leaseHeld, leaseGrace, now, p.leases.nodeID).Error; err != nil {
			return err
		}
		return tx.Exec("UPDATE "+p.db.Table("meshbroker_node")+" SET state = 'stopped', stopped_at = ?, heartbeat_at = ? WHERE node_id = ?", now, now, p.leases.nodeID).Error
	})
	if err != nil {
		return fmt.Errorf("hold leases for the next process: %w", err)
	}
	p.mu.RLock()
	n := len(p.conns)
	p.mu.RUnlock()
	p.log.Info("leases held for the next process", "count", n, "node", p.leases.nodeID)
	return nil
}
