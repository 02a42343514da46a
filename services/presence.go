package services

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// PresenceService tracks who is connected and holds each presence as an
// offline lease for cfg.LeaseTTL after its socket drops (01 §1, §6, §7).
//
// Concurrency: the registry (conns, byMesh, byKey, counts) and every field
// of a Conn marked "guarded by mu" are guarded by mu. No method holds mu
// across I/O (database, audit, another service): copy under the lock,
// unlock, then act. Offering a frame to an Outbox never blocks, so it may
// happen under mu; that is how hello_ack is guaranteed to be the first frame
// a new socket receives (H5): the socket becomes routable and gets its ack
// in one critical section. A lease timer calls expire with the generation it
// was armed with; expire re-checks it under mu, so a reattach that wins the
// race turns a late timer into a no-op, and eviction runs exactly once
// because only the caller that removes the entry from conns runs it.
//
// Background work runs on goroutines counted in bg, which Wait drains
// before storage closes: a closing socket's peer-state save (at most
// peerStateWriters at once, waiting for a slot until Shutdown closes
// stopping) and a reattach's member recheck, which ends the presence only
// if the socket it checked still holds it, deciding that and removing it
// in one critical section.
//
// Durable leases (leases.go): dirty, the set of entries whose
// meshbroker_lease row needs a rewrite, is guarded by mu too; marking an
// entry is the only lease work a hot path does, and the batched flush
// writes without the lock.
//
// Hooks (attach, detach, evict) are registered during wiring, before the
// first socket, and are read-only afterwards.
type PresenceService struct {
	cfg     config.Config
	db      *models.DB
	log     *slog.Logger
	metrics *Metrics
	members *MemberDirectory
	status  *StatusService
	audit   Auditor
	resume  *ResumeTokens
	replays *helloReplays // signed hellos seen inside the skew window (H10); guards itself
	now     func() time.Time

	onAttach []func(c *Conn, fresh bool)
	onDetach []func(c *Conn, out Outbox, unsent []string)
	onEvict  []evictHook
	bg       sync.WaitGroup // peer-state saves started by Closed, member rechecks started by reattaches
	bgSlots  chan struct{}  // bounds concurrent savePeerState writes; static
	stopping chan struct{}  // closed when Shutdown begins: saves still waiting for a slot give up
	stopOnce sync.Once
	leases   *leaseStore // durable leases (leases.go)

	mu       sync.RWMutex
	conns    map[string]*Conn            // presenceID -> entry
	byMesh   map[string]map[string]*Conn // meshID -> presenceID -> entry
	byKey    map[string][]*Conn          // meshID|pubkey (member and session keys) -> entries
	nextSeq  uint64                      // insertion order, for first-match scans
	offline  int                         // entries in grace, for the gauge
	pongs    map[string]struct{}         // presence ids whose last_ping_at needs a bump
	dirty    map[string]struct{}         // presence ids whose meshbroker_lease row needs a rewrite (leases.go)
	shutdown bool                        // set by Shutdown: no new registrations
}

// Auditor is the part of the audit service presence and messaging use.
type Auditor interface {
	Record(meshID, eventType, actorMemberID, actorName string, payload map[string]any)
}

// EvictReason says which removal path ran evictPresenceFully.
type EvictReason string

const (
	EvictLeaseExpired EvictReason = "lease_expired"
	EvictClientClosed EvictReason = "client_closed" // the short grace after a client's own normal close ran out
	EvictDedup        EvictReason = "dedup"
	EvictKick         EvictReason = "kick"
	EvictDisconnect   EvictReason = "disconnect"
	EvictBan          EvictReason = "ban"
	EvictDefensive    EvictReason = "defensive"
	EvictRevoked      EvictReason = "revoked" // a reattached member turned out revoked or deleted
)

type evictHook struct {
	name string
	fn   func(c *Conn, reason EvictReason)
}

// PeerRole is the presence row's role column.
type PeerRole string

const (
	RoleControlPlane PeerRole = "control-plane"
	RoleSession      PeerRole = "session"
)

// Kind names the hello a presence came from for log lines: "member" for a
// member-key hello (stored as role control-plane, the reference's name for
// a daemon's long-lived socket), "session" for session_hello.
func (r PeerRole) Kind() string {
	if r == RoleSession {
		return "session"
	}
	return "member"
}

// remoteOf is the peer address of out for log lines, when the outbox knows
// one (the WebSocket edge's does).
func remoteOf(out Outbox) string {
	if r, ok := out.(interface{ RemoteAddr() string }); ok {
		return r.RemoteAddr()
	}
	return ""
}

// Conn is one presence: a session's place in the registry, which outlives
// its sockets while the lease holds (the reference's "Conn").
type Conn struct {
	// Static after registration.
	PresenceID    string
	MeshID        string
	MemberID      string
	MemberPubkey  string
	SessionPubkey string // "" when the hello had none (HasSession false) or sent ""
	HasSession    bool   // a sessionPubkey key was present in the hello (even "")
	Role          PeerRole
	ConnectedAt   time.Time
	seq           uint64

	// groupsWrite serializes join_group and leave_group of this presence
	// (two sockets may briefly share it during a takeover) from reading
	// groups to publishing the saved list, so a write never publishes a
	// list computed from a stale one.
	groupsWrite sync.Mutex

	// Guarded by PresenceService.mu.
	sessionID   string
	hasSID      bool
	displayName string
	pid         int
	cwd         string
	hostname    string
	peerType    string
	channel     string
	model       string
	groups      []protocol.Group // replaced, never mutated in place: readers may keep the slice
	visible     bool
	profile     map[string]json.RawMessage
	stats       json.RawMessage // nil until set_stats
	out         Outbox          // current socket; nil while offline
	online      bool
	leaseUntil  time.Time
	leaseGen    uint64
	leaseTimer  *time.Timer
	lastPongAt  time.Time
	member      *MemberRow // as last read: at admission, or by the check after a reattach; nil for a restored lease of a revoked member
	// attestExpiresAt is the parent attestation's expiry of a session
	// presence (zero for member hellos), as last proved by a session_hello.
	attestExpiresAt time.Time
}

// RoutingPubkey is the key peers address this presence by: the session key
// when the hello carried one (even "", as the reference's `??` does), else
// the member key.
func (c *Conn) RoutingPubkey() string {
	if c.HasSession {
		return c.SessionPubkey
	}
	return c.MemberPubkey
}

// SenderSessionPubkey is what message_queue.sender_session_pubkey gets.
func (c *Conn) SenderSessionPubkey() *string {
	if c.SessionPubkey == "" {
		return nil
	}
	s := c.SessionPubkey
	return &s
}

// Outbox delivers frames to one live socket. Offer never blocks; false means
// the socket is gone or full, and the caller falls back to the durable queue.
// Close sends a close frame after the frames already offered; Terminate drops
// the connection without one (the peer sees 1006).
type Outbox interface {
	Offer(f protocol.Frame) bool
	Close(c protocol.Close)
	Terminate()
	// Unsent lists the messageIds of queue pushes that were offered but
	// never handed to the socket. Only meaningful after the socket closed.
	Unsent() []string
}

// PeerView is a copy of a presence's routing-relevant state, taken under
// the lock so callers can route without holding it.
type PeerView struct {
	Conn        *Conn
	Out         Outbox // nil while offline
	DisplayName string
	Groups      []protocol.Group
	Visible     bool
}

// NewPresenceService wires the registry to its collaborators.
func NewPresenceService(cfg config.Config, db *models.DB, log *slog.Logger, metrics *Metrics, members *MemberDirectory, status *StatusService, audit Auditor, resume *ResumeTokens, now func() time.Time) *PresenceService {
	return &PresenceService{
		cfg: cfg, db: db, log: log.With("svc", "presence"), metrics: metrics, members: members,
		status: status, audit: audit, resume: resume, replays: newHelloReplays(cfg.HelloSkew, defaultReplayEntries), now: now,
		conns: map[string]*Conn{}, byMesh: map[string]map[string]*Conn{}, byKey: map[string][]*Conn{},
		pongs: map[string]struct{}{}, bgSlots: make(chan struct{}, peerStateWriters), stopping: make(chan struct{}),
		dirty: map[string]struct{}{}, leases: &leaseStore{nodeID: models.NewID()},
	}
}

// peerStateWriters bounds the peer_state saves running at once. A mass
// disconnect starts one per socket; unbounded, a thousand of them held all
// twenty pool connections while the same clients reconnected, and the
// first reattaches waited 180 ms for a connection.
const peerStateWriters = 4

// OnAttach registers fn to run after a presence gets a socket: fresh is true
// for a new presence, false for a silent reattach. It runs after hello_ack
// was offered. Call during wiring only.
func (p *PresenceService) OnAttach(fn func(c *Conn, fresh bool)) { p.onAttach = append(p.onAttach, fn) }

// OnDetach registers fn to run when a socket of a registered presence
// closes: the presence's own socket (it enters its grace window) or one a
// takeover already replaced. unsent lists the queue pushes that socket
// cannot vouch for. Call during wiring only.
func (p *PresenceService) OnDetach(fn func(c *Conn, out Outbox, unsent []string)) {
	p.onDetach = append(p.onDetach, fn)
}

// OnEvict registers a cleanup that runs exactly once per presence, on every
// removal path (lease expiry, dedup, kick, disconnect, ban), and never on a
// close that enters grace (R1). Call during wiring only.
func (p *PresenceService) OnEvict(name string, fn func(c *Conn, reason EvictReason)) {
	p.onEvict = append(p.onEvict, evictHook{name, fn})
}

func keyOf(meshID, pubkey string) string { return meshID + "|" + pubkey }

// addLocked puts c into every index. mu must be held.
func (p *PresenceService) addLocked(c *Conn) {
	p.nextSeq++
	c.seq = p.nextSeq
	p.conns[c.PresenceID] = c
	m := p.byMesh[c.MeshID]
	if m == nil {
		m = map[string]*Conn{}
		p.byMesh[c.MeshID] = m
	}
	m[c.PresenceID] = c
	p.byKey[keyOf(c.MeshID, c.MemberPubkey)] = append(p.byKey[keyOf(c.MeshID, c.MemberPubkey)], c)
	if c.SessionPubkey != "" && c.SessionPubkey != c.MemberPubkey {
		p.byKey[keyOf(c.MeshID, c.SessionPubkey)] = append(p.byKey[keyOf(c.MeshID, c.SessionPubkey)], c)
	}
	p.metrics.ConnectionsActive.Set(float64(len(p.conns)))
}

// removeLocked takes c out of every index and reports whether it was there.
// Only the caller that gets true may run the eviction that follows.
func (p *PresenceService) removeLocked(c *Conn) bool {
	if p.conns[c.PresenceID] != c {
		return false
	}
	delete(p.conns, c.PresenceID)
	if m := p.byMesh[c.MeshID]; m != nil {
		delete(m, c.PresenceID)
		if len(m) == 0 {
			delete(p.byMesh, c.MeshID)
		}
	}
	for _, k := range []string{c.MemberPubkey, c.SessionPubkey} {
		if k == "" {
			continue
		}
		key := keyOf(c.MeshID, k)
		list := p.byKey[key]
		for i, e := range list {
			if e == c {
				list = append(list[:i:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(p.byKey, key)
		} else {
			p.byKey[key] = list
		}
	}
	if c.leaseTimer != nil {
		c.leaseTimer.Stop()
		c.leaseTimer = nil
	}
	if !c.online {
		p.offline--
	}
	c.leaseGen++
	p.metrics.ConnectionsActive.Set(float64(len(p.conns)))
	p.metrics.OfflineLeases.Set(float64(p.offline))
	return true
}

// MeshCount is the number of registry entries (online and in grace) of a mesh.
func (p *PresenceService) MeshCount(meshID string) int {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return len(p.byMesh[meshID])
}

// Get returns the entry for a presence id, or nil.
func (p *PresenceService) Get(presenceID string) *Conn {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.conns[presenceID]
}

// View copies c's routing state; ok is false when c is no longer registered.
func (p *PresenceService) View(c *Conn) (PeerView, bool) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.conns[c.PresenceID] != c {
		return PeerView{}, false
	}
	return p.viewLocked(c), true
}

func (p *PresenceService) viewLocked(c *Conn) PeerView {
	v := PeerView{Conn: c, DisplayName: c.displayName, Groups: c.groups, Visible: c.visible}
	if c.online {
		v.Out = c.out
	}
	return v
}

// Peers appends a view of every entry of the mesh, in insertion order, to buf.
func (p *PresenceService) Peers(meshID string, buf []PeerView) []PeerView {
	p.mu.RLock()
	for _, c := range p.byMesh[meshID] {
		buf = append(buf, p.viewLocked(c))
	}
	p.mu.RUnlock()
	sortViews(buf)
	return buf
}

// ByKey appends a view of every entry of the mesh whose member or session
// key is pubkey.
func (p *PresenceService) ByKey(meshID, pubkey string, buf []PeerView) []PeerView {
	p.mu.RLock()
	for _, c := range p.byKey[keyOf(meshID, pubkey)] {
		buf = append(buf, p.viewLocked(c))
	}
	p.mu.RUnlock()
	return buf
}

func sortViews(v []PeerView) {
	// Insertion sort: meshes are small (capacity 100 by default) and the
	// input comes from a map.
	for i := 1; i < len(v); i++ {
		for j := i; j > 0 && v[j].Conn.seq < v[j-1].Conn.seq; j-- {
			v[j], v[j-1] = v[j-1], v[j]
		}
	}
}

// Online reports whether c currently has a socket.
func (p *PresenceService) Online(c *Conn) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return c.online && p.conns[c.PresenceID] == c
}

// Outbox returns c's socket, or nil while it is offline or gone.
func (p *PresenceService) Outbox(c *Conn) Outbox {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if !c.online || p.conns[c.PresenceID] != c {
		return nil
	}
	return c.out
}

// Broadcast offers f to every online entry of the mesh for which keep
// returns true. keep runs under the read lock and must not call back into
// the presence service.
func (p *PresenceService) Broadcast(meshID string, f protocol.Frame, keep func(v PeerView) bool) {
	views := p.Peers(meshID, nil)
	for _, v := range views {
		if v.Out != nil && (keep == nil || keep(v)) {
			v.Out.Offer(f)
		}
	}
}

// Closed is the socket close handler (01 §7.2) for a socket that dropped
// or that the broker closed: the presence enters its grace window of
// LeaseTTL unless the socket was already replaced or the entry is gone.
// No database presence write and no broadcast happen here.
func (p *PresenceService) Closed(c *Conn, out Outbox) { p.closed(c, out, false) }

// ClosedByClient is the close handler for a socket whose client sent a
// normal close itself (1000, 1001 or a close frame without a code) before
// the broker closed it. A member presence then ends after CleanCloseLease
// instead of LeaseTTL: every real client (CLI one-shot commands, the
// daemon's member socket, the SDK's close()) closes normally only when it
// is done, and reconnects only after a drop. A session presence keeps the
// full lease: the CLI daemon closes a session socket normally when the
// session registers again and opens the same session key at once, which
// must reattach silently.
func (p *PresenceService) ClosedByClient(c *Conn, out Outbox) { p.closed(c, out, true) }

// graceFor is the grace a closing socket's presence gets.
func (p *PresenceService) graceFor(c *Conn, byClient bool) (time.Duration, EvictReason) {
	if byClient && c.Role == RoleControlPlane && p.cfg.CleanCloseLease < p.cfg.LeaseTTL {
		return p.cfg.CleanCloseLease, EvictClientClosed
	}
	return p.cfg.LeaseTTL, EvictLeaseExpired
}

func (p *PresenceService) closed(c *Conn, out Outbox, byClient bool) {
	if c == nil {
		return
	}
	p.mu.Lock()
	if p.conns[c.PresenceID] != c {
		p.mu.Unlock() // already evicted: nothing to do
		return
	}
	if p.shutdown || c.out != out {
		// A takeover replaced this socket and the lease is healthy on the
		// new one, or the broker is stopping (no grace, no peer_state):
		// only what this socket was given needs settling.
		p.mu.Unlock()
		unsent := out.Unsent()
		for _, fn := range p.onDetach {
			fn(c, out, unsent)
		}
		return
	}
	if !c.online { // cannot happen: a closed socket is only closed once
		p.mu.Unlock()
		p.evict(c, EvictDefensive, true)
		return
	}
	grace, reason := p.graceFor(c, byClient)
	c.online = false
	c.out = nil
	c.leaseUntil = p.now().Add(grace)
	c.leaseGen++
	gen := c.leaseGen
	// A zero grace still goes through the timer: the detach hooks and the
	// peer-state save below run first, and the eviction is the lease
	// expiry's own path, generation-checked like any other.
	c.leaseTimer = time.AfterFunc(grace, func() { p.expire(c, gen, reason) })
	p.offline++
	p.metrics.OfflineLeases.Set(float64(p.offline))
	p.markDirtyLocked(c)
	snap := p.peerStateLocked(c)
	p.mu.Unlock()

	p.log.Info("ws grace start", "presence_id", c.PresenceID, "mesh", c.MeshID, "peer", protocol.Short(c.RoutingPubkey()), "lease_ms", grace.Milliseconds(), "client_closed", byClient)
	unsent := out.Unsent()
	for _, fn := range p.onDetach {
		fn(c, out, unsent)
	}
	p.bg.Go(func() { p.savePeerState(snap) })
}

// Wait blocks until the background work started by Closed (peer-state
// saves) and by reattaches (member rechecks) has finished;
// the broker calls it after every socket is gone, before closing storage.
func (p *PresenceService) Wait() { p.bg.Wait() }

// expire is the lease timer: it evicts unless a reattach moved the
// generation on.
func (p *PresenceService) expire(c *Conn, gen uint64, reason EvictReason) {
	p.mu.RLock()
	current := p.conns[c.PresenceID] == c && c.leaseGen == gen && !c.online
	p.mu.RUnlock()
	if current {
		p.evictIf(c, gen, reason)
	}
}

// evictIf evicts c only if its lease generation is still gen, checked in
// the same critical section that removes it.
func (p *PresenceService) evictIf(c *Conn, gen uint64, reason EvictReason) {
	p.mu.Lock()
	if c.leaseGen != gen || c.online || !p.removeLocked(c) {
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	p.afterRemoval(c, reason, true)
}

// Evict removes c through the one eviction path (R1). announce sends
// peer_left and writes the audit row (lease expiry); the moderation and
// dedup paths pass false, as the reference sends no leave for them. It
// reports whether this call did the eviction.
func (p *PresenceService) evict(c *Conn, reason EvictReason, announce bool) bool {
	p.mu.Lock()
	removed := p.removeLocked(c)
	p.mu.Unlock()
	if removed {
		p.afterRemoval(c, reason, announce)
	}
	return removed
}

// afterRemoval is evictPresenceFully after the registry removal (01 §7.4):
// peer_left, the presence and lease rows, audit, then every registered
// cleanup. peer_left goes out first, with no I/O before it: a fresh hello
// of the same key, which can start as soon as the entry left the registry,
// needs database round trips before its join, so the leave always
// precedes the join. The cleanups run even when the database steps fail.
func (p *PresenceService) afterRemoval(c *Conn, reason EvictReason, announce bool) {
	p.metrics.Evictions.WithLabelValues(string(reason)).Inc()
	p.mu.RLock()
	name := c.displayName
	p.mu.RUnlock()
	if announce {
		f := protocol.MustEncode(protocol.NewSystemPush(c.MeshID, "peer_left", "low",
			protocol.PeerEvent{Name: name, Pubkey: c.RoutingPubkey()}, protocol.ISO(p.now())))
		p.Broadcast(c.MeshID, f, func(v PeerView) bool { return v.Conn.MemberPubkey != c.MemberPubkey })
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.markDisconnected(ctx, []string{c.PresenceID}); err != nil {
		p.log.Error("mark presence disconnected", "presence_id", c.PresenceID, "err", err)
	}
	if announce {
		p.audit.Record(c.MeshID, "peer_left", c.MemberID, name, map[string]any{})
	}
	for _, h := range p.onEvict {
		h.fn(c, reason)
	}
	p.status.Forget(c.PresenceID)
	p.log.Info("ws evict full", "presence_id", c.PresenceID, "mesh", c.MeshID, "peer", protocol.Short(c.RoutingPubkey()), "reason", reason)
}

// Pong records a pong: lastPongAt now, and last_ping_at is bumped by the
// next pong flush (batched, one UPDATE for every socket).
func (p *PresenceService) Pong(c *Conn) {
	p.mu.Lock()
	if p.conns[c.PresenceID] == c {
		c.lastPongAt = p.now()
		p.pongs[c.PresenceID] = struct{}{}
	}
	p.mu.Unlock()
}

// FlushPongs writes last_ping_at for every presence that ponged since the
// last flush.
func (p *PresenceService) FlushPongs(ctx context.Context) error {
	p.mu.Lock()
	ids := make([]string, 0, len(p.pongs))
	for id := range p.pongs {
		ids = append(ids, id)
	}
	clear(p.pongs)
	p.mu.Unlock()
	for len(ids) > 0 {
		n := min(len(ids), 500)
		err := p.db.WithContext(ctx).Exec("UPDATE "+p.db.Table("presence")+" SET last_ping_at = ? WHERE id IN ?", p.now().UTC(), ids[:n]).Error
		if err != nil {
			return fmt.Errorf("flush pongs: %w", err)
		}
		ids = ids[n:]
	}
	return nil
}

// SweepStale is the DB stale-presence sweeper (01 §7.5): rows whose
// last_ping_at is older than the threshold are marked disconnected. Memory
// is left alone; a reattach undoes it through restorePresence.
func (p *PresenceService) SweepStale(ctx context.Context) (int64, error) {
	now := p.now().UTC()
	res := p.db.WithContext(ctx).Exec("UPDATE "+p.db.Table("presence")+" SET disconnected_at = ? WHERE disconnected_at IS NULL AND last_ping_at < ?", now, now.Add(-p.cfg.StaleThreshold))
	if res.Error != nil {
		return 0, fmt.Errorf("sweep stale presence: %w", res.Error)
	}
	return res.RowsAffected, nil
}

// markDisconnected ends presences in the database: disconnected_at set
// and their lease rows gone, so the next process does not restore them.
func (p *PresenceService) markDisconnected(ctx context.Context, ids []string) error {
	return p.endPresenceRows(ctx, ids)
}

// Shutdown stops the lease timers and closes every socket with 1001. No
// peer_left, no grace, and no presence row is ended: the registry is kept
// for the next process (S2), which HoldForNextProcess records once the
// sockets are gone.
func (p *PresenceService) Shutdown(ctx context.Context) error {
	p.stopOnce.Do(func() { close(p.stopping) })
	p.mu.Lock()
	p.shutdown = true
	var outs []Outbox
	for _, c := range p.conns {
		if c.leaseTimer != nil {
			c.leaseTimer.Stop()
			c.leaseTimer = nil
		}
		c.leaseGen++
		if c.online {
			outs = append(outs, c.out)
		}
	}
	p.mu.Unlock()
	for _, o := range outs {
		o.Close(protocol.CloseShuttingDown)
	}
	return nil
}

// StaleSockets returns the online sockets whose last pong is older than
// the pong timeout; the caller terminates them (the read deadline normally
// does this first; this is the defensive watchdog of 01 §7.5, which skips
// offline leases).
func (p *PresenceService) StaleSockets() []Outbox {
	cutoff := p.now().Add(-p.cfg.PongTimeout)
	p.mu.RLock()
	defer p.mu.RUnlock()
	var out []Outbox
	for _, c := range p.conns {
		if c.online && c.lastPongAt.Before(cutoff) {
			out = append(out, c.out)
		}
	}
	return out
}
