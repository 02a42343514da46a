package services

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// MessagingService accepts sends, routes them and delivers them exactly
// once per connection (02).
//
// Delivery model. A direct message is one queue row. When a recipient
// connection is online, allowed to take the priority now, and has no
// backlog and no drain in flight, the row is inserted already claimed by
// that connection and pushed straight after the commit: no claim query per
// message. Otherwise the row is inserted unclaimed, the candidates are
// marked as having a backlog, and their drains (single-flight, with a dirty
// flag) claim it in FIFO order. A connection leaves backlog mode only after
// a drain at a status that takes every priority found nothing more. Every
// pushed, unacked row sits in its connection's inflight set until it is
// proven delivered, until the socket closes, or until the claim lease runs
// out. A row is marked delivered only on proof (M2, M3): its client_ack,
// or, for a connection that never acked, a pong to a ping the socket wrote
// after the push (Confirmed), committed within DeliveredFlush. Without
// proof it is never marked: at claim expiry it is pushed again, at socket
// close it is released for the next socket. A connection that has ever
// acked keeps even confirmed rows until their client_ack (at-least-once
// for the daemon, which dedupes). Loss is never traded for de-duplication:
// a client sees a message twice only if it was pushed and not confirmed
// before a socket loss or a crash.
//
// Concurrency: deliveries (presence id -> *delivery) is guarded by mu; each
// delivery's fields by its own mu. Neither lock is held across I/O or while
// calling another service, except that Offer (non-blocking) may run under a
// delivery's mu to keep pushes in claim order. Sends from one socket are
// accepted in order by the edge (D8); SendAsync leaves the commit pending
// and the edge completes the PendingSends in the same order, so a
// socket's acks and deliveries keep its send order while its rows share
// group commits. Drains run in their own goroutines, counted in drains.
type MessagingService struct {
	cfg      config.Config
	log      *slog.Logger
	metrics  *Metrics
	now      func() time.Time
	presence *PresenceService
	queue    *QueueService
	status   *StatusService
	members  *MemberDirectory
	audit    SendAuditor
	limiter  *Limiters[string] // member id -> send bucket

	drains sync.WaitGroup       // running drain goroutines
	topics *loadCache[[]string] // member id -> its `#topic` targets, for drains; guards itself
	// member id -> row, for scheduled sends (a burst of one member's due
	// schedules reads it once); guards itself
	schedSenders *loadCache[*MemberRow]

	mu         sync.Mutex
	stopped    bool      // set by Stop: no new drains
	multicast  recentIDs // ids of multicast rows, stored delivered: their acks need no query
	deliveries map[string]*delivery
	accepting  map[string]*acceptWait // mesh|member|client id -> send in flight
}

type delivery struct {
	conn *Conn // static

	mu        sync.Mutex
	draining  bool                // a drain goroutine is running
	dirty     bool                // a trigger arrived while draining: run once more
	backlog   bool                // unclaimed rows for this connection may exist
	everAcked bool                // the client has sent at least one client_ack
	inflight  map[string]inflight // pushed, unacked row id -> where and until when
	peak      int                 // most entries inflight has held since it was last made
}

// compactLocked replaces an emptied inflight map that once grew large: a Go
// map keeps its peak size, and after a burst every connection would hold
// the buckets of thousands of entries for nothing. d.mu must be held.
func (d *delivery) compactLocked() {
	if len(d.inflight) == 0 && d.peak > 64 {
		d.inflight, d.peak = map[string]inflight{}, 0
	}
}

// inflight is one pushed, unacked row: the socket it went to and when its
// claim runs out.
type inflight struct {
	out    Outbox
	exp    time.Time
	pushed time.Time // offered to the socket, for meshbroker_push_ack_seconds
}

type acceptWait struct {
	done chan struct{}
	ack  protocol.Ack
}

// SendAuditor is the audit messaging records to: Auditor, plus RecordPaced
// for the one entry per message, which may slow the sender rather than be
// dropped.
type SendAuditor interface {
	Auditor
	RecordPaced(meshID, eventType, actorMemberID, actorName string, payload map[string]any)
}

// NewMessagingService wires messaging; Attach connects it to presence.
func NewMessagingService(cfg config.Config, log *slog.Logger, metrics *Metrics, now func() time.Time, presence *PresenceService,
	queue *QueueService, status *StatusService, members *MemberDirectory, audit SendAuditor) *MessagingService {
	m := &MessagingService{
		cfg: cfg, log: log.With("svc", "messaging"), metrics: metrics, now: now, presence: presence, queue: queue,
		status: status, members: members, audit: audit,
		limiter:    NewLimiters[string](cfg.SendRateBurst, cfg.SendRatePerMin, sendLimiterKeys),
		deliveries: map[string]*delivery{}, accepting: map[string]*acceptWait{},
		multicast: newRecentIDs(1 << 16), topics: newLoadCache[[]string](cfg.MemberCacheTTL, 100_000),
		schedSenders: newLoadCache[*MemberRow](cfg.MemberCacheTTL, 10_000),
	}
	presence.OnAttach(m.attached)
	presence.OnDetach(m.detached)
	presence.OnEvict("messaging", func(c *Conn, _ EvictReason) { m.evicted(c) })
	status.OnRelax(m.TriggerDrain)
	return m
}

func (m *MessagingService) deliveryFor(c *Conn) *delivery {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.deliveries[c.PresenceID]
	if d == nil {
		d = &delivery{conn: c, inflight: map[string]inflight{}, backlog: true}
		m.deliveries[c.PresenceID] = d
	}
	return d
}

func (m *MessagingService) lookup(presenceID string) *delivery {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.deliveries[presenceID]
}

// attached: hello or reattach. The ack is already on the socket (H5), so
// the drain's pushes follow it (T1, T2).
func (m *MessagingService) attached(c *Conn, _ bool) {
	d := m.deliveryFor(c)
	d.mu.Lock()
	d.backlog = true
	d.mu.Unlock()
	m.trigger(d)
}

// detached: the socket closed and the lease is offline. unsent are the
// pushes the socket cannot vouch for (never written, or written but not
// followed by a pong): they may not have arrived, so they are released. A
// client that acks gets every unacked push again (M3: every message until it
// acks it); for one that never acked, a push the peer provably read past
// (normally already settled by Confirmed) is marked delivered.
// Released rows may be member-key DMs another connection can take now.
func (m *MessagingService) detached(c *Conn, out Outbox, unsent []string) {
	d := m.lookup(c.PresenceID)
	if d == nil {
		return
	}
	notSent := make(map[string]bool, len(unsent))
	for _, id := range unsent {
		notSent[id] = true
	}
	d.mu.Lock()
	var release, delivered []string
	for id, f := range d.inflight {
		if f.out != out {
			continue // went to another socket of this presence (takeover)
		}
		if d.everAcked || notSent[id] {
			release = append(release, id)
		} else {
			delivered = append(delivered, id)
		}
		delete(d.inflight, id)
	}
	d.backlog = true
	d.compactLocked()
	d.mu.Unlock()
	for _, id := range delivered {
		m.queue.MarkDeliveredAsync(id)
	}
	m.releaseFor(c, release, nil)
}

// releaseFor releases rows c could not take and drains every connection of
// c's member but except: a reattach may have drained before the release,
// and siblings may take member-key rows. A drain is a no-op for an offline
// connection.
func (m *MessagingService) releaseFor(c *Conn, ids []string, except *Conn) {
	if len(ids) == 0 {
		return
	}
	m.release(ids)
	for _, v := range m.presence.ByKey(c.MeshID, c.MemberPubkey, nil) {
		if v.Conn != except {
			m.TriggerDrain(v.Conn.PresenceID)
		}
	}
}

func (m *MessagingService) evicted(c *Conn) {
	m.mu.Lock()
	d := m.deliveries[c.PresenceID]
	delete(m.deliveries, c.PresenceID)
	m.mu.Unlock()
	if d == nil {
		return
	}
	d.mu.Lock()
	ids := make([]string, 0, len(d.inflight))
	for id := range d.inflight {
		ids = append(ids, id)
	}
	clear(d.inflight)
	d.mu.Unlock()
	m.release(ids)
}

func (m *MessagingService) release(ids []string) {
	if len(ids) == 0 {
		return
	}
	m.metrics.Redelivered.Add(float64(len(ids)))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.queue.Release(ctx, ids); err != nil {
		m.log.Error("release claims", "rows", len(ids), "err", err)
	}
}

// TriggerDrain drains a presence this process holds, if any (hook status,
// status relaxation).
func (m *MessagingService) TriggerDrain(presenceID string) {
	if d := m.lookup(presenceID); d != nil {
		d.mu.Lock()
		d.backlog = true
		d.mu.Unlock()
		m.trigger(d)
	}
}

// trigger starts a drain, or asks the running one to go round again.
func (m *MessagingService) trigger(d *delivery) {
	d.mu.Lock()
	if d.draining {
		d.dirty = true
		d.mu.Unlock()
		return
	}
	m.mu.Lock()
	if m.stopped {
		m.mu.Unlock()
		d.mu.Unlock()
		return
	}
	m.drains.Add(1)
	m.mu.Unlock()
	d.draining = true
	d.mu.Unlock()
	go func() {
		defer m.drains.Done()
		m.drain(d)
	}()
}

// StopDrains refuses new drains and waits for the running ones. The broker
// calls it before closing the sockets, so a closing socket's released rows
// are not claimed again by sockets that are closing too.
func (m *MessagingService) StopDrains() {
	m.mu.Lock()
	m.stopped = true
	m.mu.Unlock()
	m.drains.Wait()
}

// Stop refuses new drains, waits for the running ones and releases what is
// still in flight, so the next broker pushes it at once instead of after
// the claim lease. Nothing is marked delivered here: a confirmed push of a
// non-acking client has left inflight already, and anything else has no
// proof of delivery (M2). The broker calls it after every socket is
// closed, before the queue writers stop.
func (m *MessagingService) Stop() {
	m.StopDrains()
	m.mu.Lock()
	ds := make([]*delivery, 0, len(m.deliveries))
	for _, d := range m.deliveries {
		ds = append(ds, d)
	}
	m.mu.Unlock()
	var release []string
	for _, d := range ds {
		d.mu.Lock()
		for id := range d.inflight {
			release = append(release, id)
		}
		clear(d.inflight)
		d.mu.Unlock()
	}
	m.release(release)
}

// drain claims and pushes every eligible row for one connection, in FIFO
// order, until nothing is left and no trigger arrived meanwhile.
func (m *MessagingService) drain(d *delivery) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	started := time.Now()
	defer func() { m.metrics.DrainDuration.Observe(time.Since(started).Seconds()) }()
	c := d.conn
	stopDraining := func() {
		d.mu.Lock()
		d.draining, d.dirty = false, false
		d.mu.Unlock()
	}
	for {
		view, ok := m.presence.View(c)
		if !ok || view.Out == nil { // evicted or offline: never claim for a closed socket (D2)
			stopDraining()
			return
		}
		st := m.status.Effective(ctx, c.PresenceID)
		rows, err := m.claimFor(ctx, c, view.Groups, st)
		if err != nil {
			m.log.Error("drain", "presence_id", c.PresenceID, "err", err)
			stopDraining()
			return
		}
		if len(rows) > 0 && !m.pushClaimed(ctx, d, view.Out, rows) {
			// The socket is going: its close settles what it was given, and
			// the rest went back to the queue. A trigger that came meanwhile
			// (a reattach on a new socket) must still drain, or the rows
			// just released would wait for the next trigger.
			d.mu.Lock()
			if d.dirty {
				d.dirty = false
				d.mu.Unlock()
				continue
			}
			d.draining = false
			d.mu.Unlock()
			return
		}
		if len(rows) == claimBatch {
			continue
		}
		d.mu.Lock()
		if d.dirty {
			d.dirty = false
			d.mu.Unlock()
			continue
		}
		d.draining = false
		if st == StatusIdle {
			d.backlog = false
		}
		d.mu.Unlock()
		return
	}
}

// topicTargets is the member's `#topic` drain targets, cached for
// MemberCacheTTL; this process's topic joins and leaves invalidate it.
func (m *MessagingService) topicTargets(ctx context.Context, memberID string) ([]string, error) {
	return m.topics.load(ctx, memberID, m.now(), func(ctx context.Context) ([]string, error) { return m.queue.TopicTargets(ctx, memberID) })
}

func (m *MessagingService) forgetTopics(memberID string) { m.topics.drop(memberID) }

// claimFor claims the next batch of rows c may take at status st: now
// only while busy, every priority while idle (02 §3.2).
func (m *MessagingService) claimFor(ctx context.Context, c *Conn, groups []protocol.Group, st string) ([]ClaimedRow, error) {
	prios := []string{"now"}
	if st == StatusIdle {
		prios = []string{"now", "next", "low"}
	}
	topics, err := m.topicTargets(ctx, c.MemberID)
	if err != nil {
		return nil, err
	}
	return m.queue.Claim(ctx, ClaimRequest{
		MeshID: c.MeshID, Targets: append(drainTargets(c, groups), topics...), Priorities: prios,
		Claimer: c.PresenceID, Limit: claimBatch,
	})
}

// drainTargets lists the target specs a connection's drain takes (02 §5.3):
// its keys, `*`, `@all`, and `@` + every prefix of its groups.
func drainTargets(c *Conn, groups []protocol.Group) []string {
	t := []string{c.MemberPubkey, "*", "@all"}
	if c.SessionPubkey != "" {
		t = append(t, c.SessionPubkey)
	}
	for _, g := range groups {
		name := g.Name
		for {
			t = append(t, "@"+name)
			i := strings.LastIndexByte(name, '/')
			if i < 0 {
				break
			}
			name = name[:i]
		}
	}
	return t
}

// pushClaimed writes claimed rows to a socket in order. A row this socket
// already had (its claim ran out before the inflight sweep saw it) was
// never confirmed, or it would not be inflight: it is pushed again.
//
// It reports false when the socket refused a push (gone or full): the rest
// went back to the queue, and the caller must not drain this socket again.
func (m *MessagingService) pushClaimed(ctx context.Context, d *delivery, out Outbox, rows []ClaimedRow) bool {
	senderKeys := m.senderKeys(ctx, rows)
	expiry := m.now().Add(m.cfg.ClaimLease)
	pushedAt := time.Now() // real time, not the service clock: a latency metric
	var unsent []string
	d.mu.Lock()
	for i, r := range rows {
		push := protocol.Push{
			Type: "push", MessageID: r.ID, MeshID: d.conn.MeshID, SenderPubkey: senderKeys[r.SenderMemberID], Priority: r.Priority,
			Nonce: r.Nonce, Ciphertext: r.Ciphertext, CreatedAt: protocol.ISO(r.CreatedAt),
		}
		if r.SenderSessionPubkey != nil && *r.SenderSessionPubkey != "" {
			push.SenderPubkey = *r.SenderSessionPubkey
		}
		if r.ClientMessageID != nil {
			push.ClientMessageID = *r.ClientMessageID
		}
		if r.RequestFingerprint != nil {
			push.RequestFingerprint = *r.RequestFingerprint
		}
		if !out.Offer(protocol.MustEncode(push)) {
			for _, rest := range rows[i:] {
				unsent = append(unsent, rest.ID)
			}
			d.backlog = true
			break
		}
		d.inflight[r.ID] = inflight{out: out, exp: expiry, pushed: pushedAt}
		d.peak = max(d.peak, len(d.inflight))
		m.metrics.MessagesRouted.WithLabelValues(r.Priority).Inc()
	}
	d.mu.Unlock()
	// Siblings may take released member-key rows now; this socket cannot.
	m.releaseFor(d.conn, unsent, d.conn)
	return len(unsent) == 0
}

// senderKeys resolves member ids to member pubkeys for rows that carry no
// sender session key.
func (m *MessagingService) senderKeys(ctx context.Context, rows []ClaimedRow) map[string]string {
	keys := map[string]string{}
	for _, r := range rows {
		if r.SenderSessionPubkey == nil || *r.SenderSessionPubkey == "" {
			keys[r.SenderMemberID] = ""
		}
	}
	for id := range keys {
		if k, err := m.members.Pubkey(ctx, id); err == nil {
			keys[id] = k
		}
	}
	return keys
}

// Confirmed is a socket's proof that the peer read its stream past the
// pushes ids (a pong answered a ping written after them). A connection
// that never acked has them marked delivered, group-committed within
// DeliveredFlush; one that acks keeps them until their client_ack.
func (m *MessagingService) Confirmed(c *Conn, out Outbox, ids []string) {
	if c == nil || len(ids) == 0 {
		return
	}
	d := m.lookup(c.PresenceID)
	if d == nil {
		return
	}
	marks := make([]string, 0, len(ids))
	d.mu.Lock()
	if !d.everAcked {
		for _, id := range ids {
			if f, ok := d.inflight[id]; ok && f.out == out {
				delete(d.inflight, id)
				marks = append(marks, id)
			}
		}
		d.compactLocked()
	}
	d.mu.Unlock()
	for _, id := range marks {
		m.queue.MarkDeliveredAsync(id)
	}
}

// SweepInflight resolves pushed rows whose claim ran out (D4). None of
// them is proven delivered (a confirmed push of a non-acking client left
// inflight at its pong), so each is pushed again by another drain: to a
// client that acks, a redelivery it dedupes; to a frozen reader, a copy
// that its next socket gets too if this one never answers (M2: never lost).
func (m *MessagingService) SweepInflight(ctx context.Context, now time.Time) error {
	m.mu.Lock()
	ds := make([]*delivery, 0, len(m.deliveries))
	for _, d := range m.deliveries {
		ds = append(ds, d)
	}
	m.mu.Unlock()
	for _, d := range ds {
		var redrain bool
		d.mu.Lock()
		for id, f := range d.inflight {
			if f.exp.After(now) {
				continue
			}
			// Its claim has run out in the table too (the claim was taken
			// no later than this expiry was set), so the drain takes it.
			delete(d.inflight, id)
			redrain = true
			m.metrics.Redelivered.Inc()
		}
		if redrain {
			d.backlog = true
		}
		d.compactLocked()
		d.mu.Unlock()
		if redrain {
			m.trigger(d)
		}
	}
	return ctx.Err()
}

// ReapAndRedrain clears claims that ran out more than one reap interval ago
// (ours were resolved by SweepInflight by then; these are a crashed
// process's) and drains the local connections they target.
func (m *MessagingService) ReapAndRedrain(ctx context.Context) error {
	expired, err := m.queue.ReapExpired(ctx, m.now().Add(-m.cfg.ClaimReapInterval))
	if err != nil {
		return err
	}
	for _, e := range expired {
		for _, v := range m.presence.ByKey(e.MeshID, e.TargetSpec, nil) {
			m.TriggerDrain(v.Conn.PresenceID)
		}
	}
	return nil
}

// ClientAck closes a pushed message (02 §7.1). It never replies.
func (m *MessagingService) ClientAck(ctx context.Context, c *Conn, brokerID, clientID string) error {
	if brokerID == "" && clientID == "" {
		return nil
	}
	d := m.lookup(c.PresenceID)
	if d != nil {
		d.mu.Lock()
		d.everAcked = true
		sent, mine := d.inflight[brokerID]
		if mine {
			m.metrics.PushAckLatency.Observe(time.Since(sent.pushed).Seconds())
			delete(d.inflight, brokerID)
			d.compactLocked()
		}
		d.mu.Unlock()
		if mine && (clientID == "" || clientID == brokerID) {
			// Our own push to this connection: the target check already
			// held when it was claimed, so a batched mark by id is enough.
			// It is waited for, so the row cannot be claimed again between
			// this ack and its commit.
			return m.queue.MarkDeliveredWait(ctx, brokerID)
		}
	}
	if clientID == "" || clientID == brokerID {
		m.mu.Lock()
		known := m.multicast.has(brokerID)
		m.mu.Unlock()
		if known {
			return nil // a multicast row is stored delivered (D3): nothing to close
		}
	}
	n, err := m.queue.AckByClient(ctx, c.MeshID, brokerID, clientID, c.MemberPubkey, c.SessionPubkey)
	if err != nil {
		return err
	}
	m.metrics.DeliveredOnce.Add(float64(n))
	if clientID != "" && d != nil {
		// A client id may close a row pushed under its broker id.
		d.mu.Lock()
		delete(d.inflight, clientID)
		d.mu.Unlock()
	}
	return nil
}

// Pipelinable reports whether SendAsync can leave this send's commit
// pending; otherwise it completes the send before returning, and the caller
// should first let earlier pipelined sends finish to keep their order.
func (r SendRequest) Pipelinable() bool {
	return r.ClientMessageID == "" && !strings.HasPrefix(r.TargetSpec, "#")
}

// SendRequest is a validated send frame.
type SendRequest struct {
	ID                 string
	TargetSpec         string
	Priority           string // "" when absent: stored as the default "next"
	Nonce              string
	Ciphertext         string
	ClientMessageID    string
	RequestFingerprint string
	ReplyToID          string
	BodyVersion        int
}

// ParseSend validates a send frame (D7). A non-nil error's text follows
// "invalid_argument: " in the rejection ack.
func ParseSend(h protocol.Head, f *protocol.Send) (SendRequest, error) {
	r := SendRequest{ID: h.ID}
	var ok bool
	if r.TargetSpec, ok = protocol.RawString(f.TargetSpec); !ok || r.TargetSpec == "" {
		return r, fmt.Errorf("targetSpec must be a non-empty string")
	}
	if len(f.Priority) > 0 && string(f.Priority) != "null" {
		if r.Priority, ok = protocol.RawString(f.Priority); !ok || (r.Priority != "now" && r.Priority != "next" && r.Priority != "low") {
			return r, fmt.Errorf("priority must be one of now, next, low")
		}
	}
	if r.Nonce, ok = protocol.RawString(f.Nonce); !ok {
		return r, fmt.Errorf("nonce must be a string")
	}
	if r.Ciphertext, ok = protocol.RawString(f.Ciphertext); !ok {
		return r, fmt.Errorf("ciphertext must be a string")
	}
	r.ClientMessageID, _ = protocol.RawString(f.ClientMessageID)
	r.RequestFingerprint, _ = protocol.RawString(f.RequestFingerprint)
	r.ReplyToID, _ = protocol.RawString(f.ReplyToID)
	r.BodyVersion = 1
	if v, ok := protocol.RawNumber(f.BodyVersion); ok && v >= 1 && v == float64(int(v)) {
		r.BodyVersion = int(v)
	}
	return r, nil
}

// Rejection texts of 02 §1.4, byte for byte.
const (
	errRateLimit   = "rate_limit: max 60 msg/min (burst 10) — slow down"
	errNoPeer      = "no connected peer for target (not online, or targetSpec is your own key without another session)"
	errNoPeerAmbig = "no connected peer for target (ambiguous display name)"
	errGrants      = "blocked by recipient grants (sender lacks dm capability)"
)

func rejectAck(id, msg string) protocol.Ack {
	return protocol.Ack{Type: "ack", ID: id, MessageID: "", Queued: false, Error: msg}
}

// Send accepts one send (02 §1.2). reply is called with the ack after the
// row is committed and before any push the send causes; a rejection is
// also delivered through reply. The returned error is internal only.
func (m *MessagingService) Send(ctx context.Context, sender *Conn, req SendRequest, reply func(protocol.Ack)) error {
	return m.send(ctx, &sendState{}, sender, req, reply)
}

// PendingSend is an accepted send whose row is still being committed.
// Wait blocks until the commit, then acks and delivers it, or returns the
// error that kept it from being stored (it was not acked: M2).
type PendingSend struct {
	done   <-chan error
	finish func()
}

// Wait completes the send.
func (p *PendingSend) Wait() error {
	if err := <-p.done; err != nil {
		return err
	}
	p.finish()
	return nil
}

// SendAsync is Send without waiting for the commit: everything up to the
// insert happens now, in frame order; the returned PendingSend (nil when
// the send already finished, as rejections, topic posts and idempotent
// sends do) must be waited for in the same order the sends came in. A
// socket's consecutive sends then share group commits instead of paying
// one each, and the writer keeps their rows in order.
func (m *MessagingService) SendAsync(ctx context.Context, sender *Conn, req SendRequest, reply func(protocol.Ack)) (*PendingSend, error) {
	if !req.Pipelinable() {
		// The idempotency check needs earlier commits; topic posts commit
		// with their topic_message in one transaction.
		return nil, m.Send(ctx, sender, req, reply)
	}
	st := &sendState{async: true}
	err := m.send(ctx, st, sender, req, reply)
	return st.pending, err
}

// sendState carries how a send stores its row: now, or handed back as a
// PendingSend.
type sendState struct {
	async   bool
	pending *PendingSend
	// A scheduled send (see SendScheduled): claim commits with the row.
	claim     func(tx *gorm.DB) error
	scheduled bool
}

func (m *MessagingService) send(ctx context.Context, st *sendState, sender *Conn, req SendRequest, reply func(protocol.Ack)) error {
	started := m.now()
	key := ""
	if req.ClientMessageID != "" {
		key = sender.MeshID + "|" + sender.MemberID + "|" + req.ClientMessageID
		ack, done, err := m.idempotent(ctx, sender, key, req)
		if err != nil {
			return err
		}
		if done {
			reply(ack)
			return nil
		}
		defer m.finishAccept(key)
	}
	if !st.scheduled && !m.limiter.Take(sender.MemberID, m.now()) {
		m.metrics.MessagesRejected.WithLabelValues("rate_limit").Inc()
		m.setAccepted(key, rejectAck(req.ID, errRateLimit))
		reply(rejectAck(req.ID, errRateLimit))
		return nil
	}
	approx := utf8.RuneCountInString(req.Ciphertext) + utf8.RuneCountInString(req.Nonce) + utf8.RuneCountInString(req.TargetSpec)
	if approx > m.cfg.MaxMessageBytes {
		m.metrics.MessagesRejected.WithLabelValues("too_large").Inc()
		reply(rejectAck(req.ID, fmt.Sprintf("payload too large: %d bytes > MAX_MESSAGE_BYTES=%d", approx, m.cfg.MaxMessageBytes)))
		return nil
	}
	priority := req.Priority
	if priority == "" {
		priority = "next"
	}
	now := m.now()
	row := &QueueRow{
		ID: models.NewID(), MeshID: sender.MeshID, SenderMemberID: sender.MemberID, SenderSessionPubkey: sender.SenderSessionPubkey(),
		TargetSpec: req.TargetSpec, Priority: priority, Nonce: req.Nonce, Ciphertext: req.Ciphertext, CreatedAt: now,
	}
	if req.ClientMessageID != "" {
		row.ClientMessageID = &req.ClientMessageID
	}
	if req.RequestFingerprint != "" {
		row.RequestFingerprint = &req.RequestFingerprint
	}
	var err error
	switch t := req.TargetSpec; {
	case t == "*" || t == "@all":
		err = m.sendMulticast(ctx, st, sender, req, row, "broadcast", reply)
	case strings.HasPrefix(t, "@"):
		err = m.sendMulticast(ctx, st, sender, req, row, "group", reply)
	case strings.HasPrefix(t, "#"):
		err = m.sendTopic(ctx, sender, req, row, reply)
	default:
		err = m.sendDirect(ctx, st, sender, req, row, reply)
	}
	m.metrics.AcceptLatency.Observe(m.now().Sub(started).Seconds())
	return err
}

// accepted records the ack a send with a client id got, for retries.
func (m *MessagingService) setAccepted(key string, ack protocol.Ack) {
	if key == "" {
		return
	}
	m.mu.Lock()
	if w := m.accepting[key]; w != nil {
		w.ack = ack
	}
	m.mu.Unlock()
}

func (m *MessagingService) finishAccept(key string) {
	m.mu.Lock()
	w := m.accepting[key]
	delete(m.accepting, key)
	m.mu.Unlock()
	if w != nil {
		close(w.done)
	}
}

// idempotent implements D10: a retried client_message_id gets the original
// ack; a reused one with another fingerprint is refused. A retry racing the
// original waits for it. done reports that ack is the answer.
func (m *MessagingService) idempotent(ctx context.Context, sender *Conn, key string, req SendRequest) (protocol.Ack, bool, error) {
	for {
		m.mu.Lock()
		w := m.accepting[key]
		if w == nil {
			m.accepting[key] = &acceptWait{done: make(chan struct{})}
			m.mu.Unlock()
			break
		}
		m.mu.Unlock()
		select {
		case <-w.done:
		case <-ctx.Done():
			return protocol.Ack{}, false, ctx.Err()
		}
	}
	row, err := m.queue.ByClientID(ctx, sender.MeshID, sender.MemberID, req.ClientMessageID)
	if err != nil {
		m.finishAccept(key)
		return protocol.Ack{}, false, err
	}
	if row == nil {
		return protocol.Ack{}, false, nil
	}
	m.finishAccept(key)
	if row.RequestFingerprint != nil && req.RequestFingerprint != "" && *row.RequestFingerprint != req.RequestFingerprint {
		return rejectAck(req.ID, "invalid: client_message_id reused with a different request_fingerprint"), true, nil
	}
	return protocol.Ack{Type: "ack", ID: req.ID, MessageID: row.ID, Queued: true}, true, nil
}

// store commits the row, then audits it, acks it and runs after (the
// send's deliveries). With st.async the commit is left pending and the rest
// runs in PendingSend.Wait; after must then not use the frame's ctx.
func (m *MessagingService) store(ctx context.Context, st *sendState, sender *Conn, req SendRequest, row *QueueRow, reply func(protocol.Ack), after func()) error {
	finish := func() {
		m.audit.RecordPaced(sender.MeshID, "message_sent", sender.MemberID, m.presence.DisplayName(sender), map[string]any{"targetSpec": row.TargetSpec, "priority": row.Priority})
		reply(protocol.Ack{Type: "ack", ID: req.ID, MessageID: row.ID, Queued: true})
		after()
	}
	if st.claim != nil {
		if err := m.queue.InsertWithin(ctx, row, st.claim); err != nil {
			return fmt.Errorf("scheduled send of %s: %w", protocol.Short(sender.MemberPubkey), err)
		}
		finish()
		return nil
	}
	if st.async {
		done, err := m.queue.InsertAsync(ctx, row)
		if err != nil {
			return fmt.Errorf("accept send from %s: %w", protocol.Short(sender.RoutingPubkey()), err)
		}
		st.pending = &PendingSend{done: done, finish: finish}
		return nil
	}
	if err := m.queue.Insert(ctx, row); err != nil {
		return fmt.Errorf("accept send from %s: %w", protocol.Short(sender.RoutingPubkey()), err)
	}
	finish()
	return nil
}

// afterCtx bounds the deliveries that follow a commit; they outlive the
// frame that caused them when the send was pipelined.
func afterCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

// sendDirect routes a DM to a member or session key (02 §2.1).
func (m *MessagingService) sendDirect(ctx context.Context, st *sendState, sender *Conn, req SendRequest, row *QueueRow, reply func(protocol.Ack)) error {
	cands := m.directCandidates(sender, row.TargetSpec)
	if len(cands) == 0 && !protocol.IsHex(row.TargetSpec, 64) {
		resolved, ambiguous := m.resolveName(sender, row.TargetSpec)
		if ambiguous {
			m.metrics.MessagesRejected.WithLabelValues("no_recipient").Inc()
			reply(rejectAck(req.ID, errNoPeerAmbig))
			return nil
		}
		if resolved != "" {
			row.TargetSpec = resolved
			cands = m.directCandidates(sender, resolved)
		}
	}
	if len(cands) == 0 && st.scheduled && protocol.IsHex(row.TargetSpec, 64) {
		return m.queueForLater(ctx, st, sender, req, row, reply)
	}
	if len(cands) == 0 {
		m.metrics.MessagesRejected.WithLabelValues("no_recipient").Inc()
		reply(rejectAck(req.ID, errNoPeer))
		return nil
	}
	grants, err := m.members.Grants(ctx, sender.MeshID)
	if err != nil {
		return err
	}
	allowed := cands[:0:0]
	for _, v := range cands {
		if Allows(grants[v.Conn.MemberPubkey], sender.MemberPubkey, sender.SessionPubkey, "dm") {
			allowed = append(allowed, v)
		} else {
			m.metrics.MessagesDroppedGrant.WithLabelValues("dm").Inc()
		}
	}
	if len(allowed) == 0 {
		reply(rejectAck(req.ID, errGrants))
		return nil
	}
	// Pick a connection that can take it now, or leave it to the drains.
	var claimer *delivery
	var claimOut Outbox
	for _, v := range allowed {
		if v.Out == nil {
			continue
		}
		d := m.deliveryFor(v.Conn)
		d.mu.Lock()
		free := !d.draining && !d.backlog
		d.mu.Unlock()
		if !free {
			continue
		}
		if status := m.status.Effective(ctx, v.Conn.PresenceID); status != StatusIdle && row.Priority != "now" {
			continue
		}
		claimer, claimOut = d, v.Out
		break
	}
	if claimer != nil {
		at := row.CreatedAt.UTC()
		exp := at.Add(m.cfg.ClaimLease)
		pid := claimer.conn.PresenceID
		row.ClaimedAt, row.ClaimID, row.ClaimExpiresAt = &at, &pid, &exp
	}
	return m.store(ctx, st, sender, req, row, reply, func() {
		if claimer != nil {
			ctx, cancel := afterCtx()
			defer cancel()
			m.pushClaimed(ctx, claimer, claimOut, []ClaimedRow{{
				ID: row.ID, SenderMemberID: row.SenderMemberID, SenderSessionPubkey: row.SenderSessionPubkey, TargetSpec: row.TargetSpec,
				Priority: row.Priority, Nonce: row.Nonce, Ciphertext: row.Ciphertext, CreatedAt: row.CreatedAt,
				ClientMessageID: row.ClientMessageID, RequestFingerprint: row.RequestFingerprint,
			}})
			return
		}
		for _, v := range allowed {
			d := m.deliveryFor(v.Conn)
			d.mu.Lock()
			d.backlog = true
			d.mu.Unlock()
			if v.Out != nil {
				m.trigger(d)
			}
		}
	})
}

// directCandidates are the registry entries (online or in grace) of the
// sender's mesh holding the target as member or session key, the sender's
// own connection excluded.
func (m *MessagingService) directCandidates(sender *Conn, target string) []PeerView {
	views := m.presence.ByKey(sender.MeshID, target, nil)
	out := views[:0]
	for _, v := range views {
		if v.Conn != sender {
			out = append(out, v)
		}
	}
	return out
}

// resolveName maps a display name to a routing key (02 §2.1 [EXT]):
// case-insensitive over online, visible connections, first connected wins;
// matches of two members are ambiguous.
func (m *MessagingService) resolveName(sender *Conn, name string) (key string, ambiguous bool) {
	var first *PeerView
	members := map[string]bool{}
	for _, v := range m.presence.Peers(sender.MeshID, nil) {
		if v.Conn == sender || v.Out == nil || !v.Visible || !strings.EqualFold(v.DisplayName, name) {
			continue
		}
		members[v.Conn.MemberID] = true
		if first == nil {
			vv := v
			first = &vv
		}
	}
	if len(members) > 1 {
		return "", true
	}
	if first == nil {
		return "", false
	}
	return first.Conn.RoutingPubkey(), false
}

// sendMulticast handles `*`, `@all` and `@group` (02 §2.2, §2.3): the row
// is stored already delivered (D3), then pushed live once to each eligible
// connection.
func (m *MessagingService) sendMulticast(ctx context.Context, st *sendState, sender *Conn, req SendRequest, row *QueueRow, kind string, reply func(protocol.Ack)) error {
	delivered := row.CreatedAt
	row.DeliveredAt = &delivered
	return m.store(ctx, st, sender, req, row, reply, func() {
		ctx, cancel := afterCtx()
		defer cancel()
		if err := m.fanOut(ctx, sender, req, row, kind); err != nil {
			m.log.Error("multicast fan-out", "msg_id", row.ID, "err", err)
		}
	})
}

// fanOut pushes a stored multicast row live to every eligible connection.
func (m *MessagingService) fanOut(ctx context.Context, sender *Conn, req SendRequest, row *QueueRow, kind string) error {
	m.mu.Lock()
	m.multicast.add(row.ID)
	m.mu.Unlock()
	grants, err := m.members.Grants(ctx, sender.MeshID)
	if err != nil {
		return err
	}
	group := ""
	if kind == "group" && row.TargetSpec != "@all" {
		group = strings.TrimPrefix(row.TargetSpec, "@")
	}
	f := m.multicastFrame(sender, req, row, "")
	for _, v := range m.presence.Peers(sender.MeshID, nil) {
		if v.Out == nil || v.Conn.MemberPubkey == sender.MemberPubkey || !v.Visible {
			continue
		}
		if group != "" && !hasGroup(v.Groups, group) {
			continue
		}
		if row.TargetSpec == "@" {
			continue // `@` alone is an empty group name: stored, never delivered
		}
		if !Allows(grants[v.Conn.MemberPubkey], sender.MemberPubkey, sender.SessionPubkey, "broadcast") {
			m.metrics.MessagesDroppedGrant.WithLabelValues("broadcast").Inc()
			continue
		}
		if v.Out.Offer(f) {
			m.metrics.MessagesRouted.WithLabelValues(row.Priority).Inc()
		}
	}
	return nil
}

func hasGroup(groups []protocol.Group, name string) bool {
	for _, g := range groups {
		if g.Name == name {
			return true
		}
	}
	return false
}

func (m *MessagingService) multicastFrame(sender *Conn, req SendRequest, row *QueueRow, topic string) protocol.Frame {
	return protocol.MustEncode(protocol.MulticastPush{
		Type: "push", MessageID: row.ID, MeshID: sender.MeshID, SenderPubkey: senderKey(sender), SenderMemberPubkey: sender.MemberPubkey,
		SenderMemberID: sender.MemberID, SenderName: m.presence.DisplayName(sender), Priority: row.Priority, Nonce: row.Nonce,
		Ciphertext: row.Ciphertext, CreatedAt: protocol.ISO(m.now()), Topic: topic, ReplyToID: req.ReplyToID,
	})
}

func senderKey(c *Conn) string {
	if c.SessionPubkey != "" {
		return c.SessionPubkey
	}
	return c.MemberPubkey
}

// sendLimiterKeys bounds the send buckets kept; the keys are member ids of
// authenticated senders, so this is never reached in practice.
const sendLimiterKeys = 100_000

// GCBuckets drops send rate-limit buckets that have refilled.
func (m *MessagingService) GCBuckets() { m.limiter.Sweep(m.now()) }

// recentIDs is a bounded set that forgets its oldest ids first. Not safe
// for concurrent use: the owner's lock guards it.
type recentIDs struct {
	set  map[string]struct{}
	ring []string
	next int
}

func newRecentIDs(n int) recentIDs {
	return recentIDs{set: map[string]struct{}{}, ring: make([]string, n)} // the set grows with use
}

func (r *recentIDs) add(id string) {
	if old := r.ring[r.next]; old != "" {
		delete(r.set, old)
	}
	r.ring[r.next] = id
	r.set[id] = struct{}{}
	r.next = (r.next + 1) % len(r.ring)
}

func (r *recentIDs) has(id string) bool {
	_, ok := r.set[id]
	return ok
}
