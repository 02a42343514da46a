package services

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// Realtime owns the extras whose lifetime follows presence (04 §2-§9): URL
// watches, stream subscriptions, the peer-hosted MCP registry with its
// pending calls, and the per-mesh simulation clock, all in memory; plus the
// stream catalogue (mesh.stream) and shared state (mesh.state) in the
// database. One file per feature: realtime_watch.go (with the address guard
// in realtime_ssrf.go), realtime_stream.go, realtime_mcp.go,
// realtime_clock.go, realtime_state.go.
//
// Concurrency: every in-memory table below is guarded by mu, a leaf lock.
// Under mu the code only reads and writes maps and fields and stops or
// resets timers (neither blocks). It never holds mu across I/O: database
// queries, DNS, HTTP fetches, audit records, presence lookups (which take
// the presence lock) and Outbox.Offer all happen after Unlock, on values
// copied under it. Presence never calls into Realtime while holding its own
// lock (its hooks run after it unlocked), so the two locks never nest.
//
// Timers are time.AfterFunc callbacks (watch polls, clock ticks, MCP call
// deadlines). Each callback re-checks its entry under mu (a stopped flag, a
// generation, or map membership), so a callback that races Stop is a no-op.
// Watch checks run in goroutines counted in wg. Close sets closed under mu
// (after which no timer is armed and no check starts), stops every timer,
// cancels ctx (aborting fetches in flight) and waits for wg, so nothing the
// extras started outlives Close.
//
// Lifetime (R1): everything is keyed by presence id, so a silent reattach
// keeps it all, and so does a restart: realtime_persist.go writes it to
// meshbroker_realtime and restores it for the restored leases. A close that enters grace changes nothing here: watches keep
// polling and subscriptions and MCP entries stay, but frames for a presence
// without a socket are dropped. The OnEvict hook, which presence runs
// exactly once per presence on every removal path (lease expiry, dedup,
// kick, disconnect, ban), removes the presence's watches and subscriptions,
// takes its MCP entries offline or away, fails the calls it was hosting,
// and pauses the mesh clock when the mesh has no entry left.
type Realtime struct {
	// Static after construction.
	cfg      config.Config
	db       *models.DB
	log      *slog.Logger
	metrics  *Metrics
	now      func() time.Time
	presence *PresenceService
	audit    Auditor
	http     *http.Client // watch fetches; its dialer consults addrPolicy
	// addrPolicy refuses a watch target address (R2); nil when
	// cfg.WatchAllowPrivate. Internal tests may replace it before use.
	addrPolicy func(netip.Addr) error
	ctx        context.Context // cancelled by Close: aborts fetches in flight
	cancel     context.CancelFunc
	wg         sync.WaitGroup // watch checks in flight; Add only under mu while !closed
	flushWG    sync.WaitGroup // the persistence loop (realtime_persist.go)

	mu          sync.Mutex
	closed      bool
	seq         uint64                        // creation order of watches and MCP entries
	watches     map[string]*watch             // watch id -> watch
	subs        map[streamKey]map[string]bool // (mesh, stream) -> subscribed presence ids
	servers     map[mcpKey]*mcpServer         // (mesh, server name) -> entry
	calls       map[string]*mcpCall           // call id -> pending call
	clocks      map[string]*meshClock         // mesh id -> clock; never deleted
	callTimeout time.Duration                 // mcpCallTimeout; ForTest may shrink it
	dirty       map[string]struct{}           // meshes whose meshbroker_realtime rows need a rewrite
}

// Timing and limits of the extras. The reference's numbers come first.
const (
	// URL watches (04 §3, R2).
	watchFetchTimeout    = 10 * time.Second // one check: connect, redirects and body
	watchDefaultInterval = 30.0             // seconds, when the request names none
	watchMinInterval     = 5.0              // seconds; a smaller interval is raised to it (R2)
	watchMaxInterval     = 24 * 60 * 60.0   // seconds; a larger one is lowered to it (R2)
	watchMaxRedirects    = 20               // as fetch follows
	watchMaxBody         = 1 << 20          // bytes; a larger body is a failed check
	watchLookupTimeout   = 3 * time.Second  // the name check when a watch is created
	maxWatchesPerMember  = 20               // per member and mesh, all its sessions together
	maxWatchesPerMesh    = 100              // per mesh

	// MCP registry (04 §5).
	mcpCallTimeout = 30 * time.Second // a forwarded call's deadline

	// Mesh clock (04 §6): a tick is one simulated minute, every 60 s / speed.
	clockMinSpeed = 1.0
	clockMaxSpeed = 100.0
)

// NewRealtime wires the extras to presence's hooks.
func NewRealtime(cfg config.Config, db *models.DB, log *slog.Logger, metrics *Metrics, now func() time.Time, presence *PresenceService, audit Auditor) *Realtime {
	ctx, cancel := context.WithCancel(context.Background())
	r := &Realtime{
		cfg: cfg, db: db, log: log.With("svc", "realtime"), metrics: metrics, now: now, presence: presence, audit: audit,
		ctx: ctx, cancel: cancel,
		watches: map[string]*watch{}, subs: map[streamKey]map[string]bool{}, servers: map[mcpKey]*mcpServer{},
		calls: map[string]*mcpCall{}, clocks: map[string]*meshClock{}, callTimeout: mcpCallTimeout,
		dirty: map[string]struct{}{},
	}
	if !cfg.WatchAllowPrivate {
		r.addrPolicy = refuseInternal
	}
	r.http = newWatchClient(r.checkDialAddr)
	presence.OnEvict("realtime", r.onEvict)
	presence.OnAttach(r.onAttach)
	if db != nil { // unit tests run the extras without storage
		r.flushWG.Add(1)
		go r.runFlushLoop(max(cfg.LeaseFlush, time.Millisecond))
	}
	return r
}

// Close stops every timer the extras run (watch polls, clock ticks, call
// deadlines) and waits for the watch checks in flight. Pending MCP callers
// get no reply: their sockets are closed by then.
func (r *Realtime) Close() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return
	}
	r.closed = true
	for _, w := range r.watches {
		w.stopLocked()
	}
	for _, k := range r.clocks {
		k.stopLocked()
	}
	for id, c := range r.calls {
		c.timer.Stop()
		delete(r.calls, id)
	}
	r.mu.Unlock()
	r.cancel()
	r.wg.Wait()
	r.flushWG.Wait()
	if r.db != nil {
		r.persistAll()
	}
	r.http.CloseIdleConnections()
}

// onEvict is the eviction cleanup of 04 §2 steps 5-8, run once per
// presence on every removal path (R1).
func (r *Realtime) onEvict(c *Conn, reason EvictReason) {
	r.mu.Lock()
	watches := r.dropWatchesLocked(c)
	subs := r.dropSubscriptionsLocked(c)
	offline, removed, failed := r.evictMCPLocked(c)
	r.markDirtyLocked(c.MeshID)
	r.mu.Unlock()

	for _, call := range failed {
		r.finishCall(call, nil, fmt.Sprintf("MCP server %q host disconnected", call.serverName))
	}
	r.pauseIfEmpty(c.MeshID)
	if watches+subs+offline+removed+len(failed) > 0 {
		r.log.Info("realtime evict", "presence_id", c.PresenceID, "mesh", c.MeshID, "reason", reason,
			"watches", watches, "subscriptions", subs, "mcp_offline", offline, "mcp_removed", removed, "calls_failed", len(failed))
	}
}

// onAttach restores the member's persistent MCP entries when a member
// hello (not session_hello, not a reattach) creates a presence (04 §5.6).
func (r *Realtime) onAttach(c *Conn, fresh bool) {
	if fresh && c.Role == RoleControlPlane {
		r.restoreMCP(c)
	}
}

// sendTo offers f to a presence's current socket; false when it has none
// (gone, or in grace: the frame is dropped, nothing here queues).
func (r *Realtime) sendTo(presenceID string, f protocol.Frame) bool {
	c := r.presence.Get(presenceID)
	if c == nil {
		return false
	}
	out := r.presence.Outbox(c)
	return out != nil && out.Offer(f)
}

// broadcastOthers offers f to every online presence of the mesh but skip.
func (r *Realtime) broadcastOthers(meshID, skip string, f protocol.Frame) {
	r.presence.Broadcast(meshID, f, func(v PeerView) bool { return v.Conn.PresenceID != skip })
}

func (r *Realtime) systemPush(meshID, event, priority string, data any) protocol.Frame {
	return protocol.MustEncode(protocol.NewSystemPush(meshID, event, priority, data, protocol.ISO(r.now())))
}

// memberName is the caller's member display name from the database (not
// the connection's), as publishedBy, createdBy and updatedBy use; ok is
// false when the member row is gone.
func (r *Realtime) memberName(ctx context.Context, c *Conn) (name string, ok bool, err error) {
	var names []string
	err = r.db.WithContext(ctx).Raw("SELECT display_name FROM "+r.db.Table("member")+" WHERE id = ? AND revoked_at IS NULL LIMIT 1", c.MemberID).Scan(&names).Error
	if err != nil {
		return "", false, fmt.Errorf("member name of %s: %w", c.MemberID, err)
	}
	if len(names) == 0 {
		return "", false, nil
	}
	return names[0], true, nil
}

// RealtimeTest exposes test hooks. Get it with ForTest.
type RealtimeTest struct{ r *Realtime }

// ForTest returns the test hooks; it panics outside a test binary.
func (r *Realtime) ForTest() RealtimeTest {
	if !testing.Testing() {
		panic("services: Realtime.ForTest called outside a test")
	}
	return RealtimeTest{r}
}

// SetMCPCallTimeout changes the deadline of calls forwarded from now on.
// Defaults to 30 seconds.
func (t RealtimeTest) SetMCPCallTimeout(d time.Duration) {
	t.r.mu.Lock()
	t.r.callTimeout = d
	t.r.mu.Unlock()
}

// CheckWatch runs one check of the watch now, after any check in flight,
// and returns when it is done; false when the watch does not exist.
func (t RealtimeTest) CheckWatch(id string) bool {
	r := t.r
	for {
		r.mu.Lock()
		w := r.watches[id]
		if w == nil || w.stopped {
			r.mu.Unlock()
			return false
		}
		if r.beginCheckLocked(w) {
			r.mu.Unlock()
			r.runCheck(w)
			return true
		}
		r.mu.Unlock()
		time.Sleep(2 * time.Millisecond)
	}
}

// HasWatch reports whether a watch with that id exists.
func (t RealtimeTest) HasWatch(id string) bool {
	t.r.mu.Lock()
	defer t.r.mu.Unlock()
	return t.r.watches[id] != nil
}
