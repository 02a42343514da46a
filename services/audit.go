package services

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// AuditService appends metadata-only events to the per-mesh hash chain.
// It owns mesh.audit_log (04 §1): Record appends, Query answers
// audit_query, Verify answers audit_verify.
//
// Concurrency: Record runs on its callers' goroutines (hello, send,
// eviction, ban). It stamps createdAt and canonicalizes the payload right
// there, so neither the queueing delay nor a later change to the caller's
// map can alter what is hashed, and then offers the entry to queue without
// waiting: a reply never waits on the database. A full queue is counted and
// logged, never waited on, except by RecordPaced (a send's message_sent, on
// the goroutine that acks it), which waits up to auditPaceWait for room, so
// senders outrunning the writer are slowed to its pace rather than losing
// their entries. One writer goroutine (run) owns everything after
// that: it takes whatever is queued, up to maxAuditBatch entries, splits it
// by mesh in arrival order and appends each mesh's share in one
// transaction. mu guards only closed, so that Close can shut producers out
// before the writer drains the queue: every entry is either in the queue
// when the drain starts or refused (and counted) by Record, never stranded.
// Query and Verify are plain reads on any goroutine.
//
// Why the lock: each row's prev_hash is the hash of the mesh's previous row,
// so two appends to one mesh must never read the same tail, or the chain
// forks (04 §9 audit 5). Inside this process the single writer already
// orders them. Across processes (another replica, or the reference broker
// on the same database) each transaction first takes
// pg_advisory_xact_lock on the reference's per-mesh key and only then reads
// the tail, which under READ COMMITTED sees every append committed before
// the lock was granted; the lock is held until our own commit (04 §1.2, A2).
// The tail is always read under the lock, never cached (04 §1.6). On SQLite,
// transactions begin IMMEDIATE (models.Open), which takes the database's
// write lock before the tail is read and so serializes appends across
// processes as well.
type AuditService struct {
	// static after construction
	db      *models.DB
	log     *slog.Logger
	metrics *Metrics
	now     func() time.Time
	queue   chan *auditEntry   // never closed: closed (below) keeps producers out instead
	stop    chan struct{}      // closed once by Close: drain the queue, then exit
	done    chan struct{}      // closed by run when it returns
	ctx     context.Context    // parent of every write; abort cancels it
	abort   context.CancelFunc // called when Close's deadline passes, so remaining writes fail fast

	startOnce sync.Once

	// stalled is set when a paced wait ran out (the writer is stuck, say on
	// another process's lock) and cleared by the writer's next batch; while
	// set, RecordPaced does not wait, so a stuck writer costs each sender
	// one wait, not one per message.
	stalled atomic.Bool

	mu     sync.RWMutex
	closed bool // guarded by mu; set by Close, after which Record refuses entries
}

// Audit sizing. The queue absorbs bursts (a mesh-wide broadcast storm, a
// mass reconnect) while the database is slow; at a few hundred bytes an
// entry, a full queue is tens of megabytes.
const (
	auditQueueSize = 65536
	// maxAuditBatch bounds the rows of one writer pass, and so of one
	// INSERT: eight arrays on Postgres; on SQLite 8 parameters a row, 8,192
	// in all, below its limit of 32,766.
	maxAuditBatch = 1024
	// sqliteAuditRowsPerTx bounds one audit transaction on SQLite.
	sqliteAuditRowsPerTx = 128
	sqliteAuditLinger    = 25 * time.Millisecond
	// auditPaceWait bounds how long RecordPaced waits for room in a full
	// queue before the entry is given up: many batches' time for a writer
	// that is merely behind.
	auditPaceWait = time.Second
	// auditTxTimeout bounds one append transaction, including the wait for
	// another process's advisory lock.
	auditTxTimeout = 30 * time.Second
	// auditVerifyPage is how many rows Verify reads per query. Paging by id
	// releases the connection between pages, which on SQLite (one
	// connection) lets appends proceed while a long chain is checked.
	auditVerifyPage = 1000
)

// Query limits (A3). The reference has no cap; meshbroker returns at most
// MaxAuditQueryLimit rows a call.
const (
	DefaultAuditQueryLimit = 50
	MaxAuditQueryLimit     = 500
)

// auditGenesis is the prev_hash of a mesh's first row.
const auditGenesis = "genesis"

var (
	errAuditClosed    = errors.New("audit log closed")
	errAuditQueueFull = errors.New("audit queue full")
)

// auditEntry is one event waiting for the writer; everything hashed is fixed
// at Record time.
type auditEntry struct {
	meshID        string
	eventType     string
	actorMemberID *string // nil is SQL NULL, hashed as "null"
	actorName     *string // nil is SQL NULL; not hashed
	payload       []byte  // canonical JSON: what is hashed and what is stored
	createdAt     time.Time
}

var _ Auditor = (*AuditService)(nil)

// NewAuditService makes the audit log; Start runs its writer. now defaults
// to time.Now.
func NewAuditService(db *models.DB, log *slog.Logger, metrics *Metrics, now func() time.Time) *AuditService {
	if now == nil {
		now = time.Now
	}
	ctx, abort := context.WithCancel(context.Background())
	return &AuditService{
		db: db, log: log.With("svc", "audit"), metrics: metrics, now: now,
		queue: make(chan *auditEntry, auditQueueSize), stop: make(chan struct{}), done: make(chan struct{}),
		ctx: ctx, abort: abort,
	}
}

// Start runs the writer. It is idempotent.
func (a *AuditService) Start() {
	a.startOnce.Do(func() { go a.run() })
}

// Close stops accepting entries, writes everything already queued and stops
// the writer. If ctx ends first, the writes still pending are abandoned: each
// of those entries is logged (metadata only) and counted in AuditFailed, and
// Close returns ctx's error once the writer has exited. Close starts the
// writer if Start was never called, so nothing recorded is left behind. A
// second Close waits for the same drain, and cuts it short the same way if
// its own ctx ends first.
func (a *AuditService) Close(ctx context.Context) error {
	a.mu.Lock()
	first := !a.closed
	a.closed = true
	a.mu.Unlock()
	if first {
		close(a.stop)
	}
	a.Start()
	defer a.abort() // releases the context once the writer is gone
	select {
	case <-a.done: // already drained: success even if ctx has ended too
		return nil
	default:
	}
	select {
	case <-a.done:
		return nil
	case <-ctx.Done():
		a.abort()
		<-a.done
		return fmt.Errorf("close audit log: %w", ctx.Err())
	}
}

// Record queues one event and returns at once. An empty actorMemberID or
// actorName is stored as NULL (a system event: its actor hashes as "null"
// and reads back as "system"); a nil payload is {}. An entry that cannot be
// queued (the payload has no JSON form, the queue is full, the service is
// closed) is logged with its metadata, never its payload, and counted in
// AuditFailed.
func (a *AuditService) Record(meshID, eventType, actorMemberID, actorName string, payload map[string]any) {
	a.record(meshID, eventType, actorMemberID, actorName, payload, 0)
}

// RecordPaced is Record for a caller that may be slowed down: when the
// queue is full it waits for room, up to auditPaceWait, before giving the
// entry up (and until the writer moves again, later callers do not wait). Sends record their message_sent this way, on the goroutine that
// acks them, so a burst that outruns the audit writer is held to its pace
// (acks come later, the socket stops being read) instead of losing its
// audit entries: unpaced, 100 x 3,000 messages lost 119,087 of 300,000.
func (a *AuditService) RecordPaced(meshID, eventType, actorMemberID, actorName string, payload map[string]any) {
	a.record(meshID, eventType, actorMemberID, actorName, payload, auditPaceWait)
}

func (a *AuditService) record(meshID, eventType, actorMemberID, actorName string, payload map[string]any, wait time.Duration) {
	e := auditEntry{
		meshID: meshID, eventType: eventType,
		actorMemberID: nullIfEmpty(actorMemberID), actorName: nullIfEmpty(actorName),
		// Taken before the transaction, as the reference does (04 §1.2 step 1).
		createdAt: a.now().UTC().Truncate(time.Millisecond),
	}
	canon := []byte("{}")
	if payload != nil {
		var err error
		if canon, err = CanonicalJSON(payload); err != nil {
			a.fail(e, err)
			return
		}
	}
	e.payload = canon
	if err := a.enqueue(e, wait); err != nil {
		a.fail(e, err)
	}
}

// enqueue offers e to the writer, waiting up to wait for room in a full
// queue. The read lock is held while waiting, so Close (which takes the
// write lock before the final drain) cannot strand the entry; the writer
// does not need the lock, so the wait always ends.
func (a *AuditService) enqueue(e auditEntry, wait time.Duration) error {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.closed {
		return errAuditClosed
	}
	// Raised before the send so the writer's decrement can never run first
	// and dip the gauge below zero.
	a.metrics.AuditPending.Inc()
	select {
	case a.queue <- &e: // a pointer: the queue's buffer is 64K slots, resident once used
		return nil
	default:
	}
	if wait > 0 && !a.stalled.Load() {
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case a.queue <- &e:
			return nil
		case <-t.C:
			a.stalled.Store(true)
		}
	}
	a.metrics.AuditPending.Dec()
	return errAuditQueueFull
}

// fail records the loss of e. The log line is the entry's last trace, so it
// carries every hashed field except the payload, which may hold user data
// (a state_set key) and is never logged.
func (a *AuditService) fail(e auditEntry, err error) {
	a.metrics.AuditFailed.Inc()
	actor := ""
	if e.actorMemberID != nil {
		actor = *e.actorMemberID
	}
	a.log.Error("audit entry lost", "mesh", e.meshID, "event_type", e.eventType, "actor_member_id", actor,
		"created_at", protocol.ISO(e.createdAt), "payload_bytes", len(e.payload), "err", err)
}

func nullIfEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// run is the writer. It exits after stop is closed and the queue is empty;
// since Close sets closed before closing stop, nothing can arrive after the
// final empty check.
func (a *AuditService) run() {
	defer close(a.done)
	batch := make([]auditEntry, 0, maxAuditBatch)
	// On SQLite every audit commit takes the one connection that sends
	// commit on, and writes its pages to the WAL again: a writer that
	// committed less than sqliteAuditLinger ago waits out the rest first,
	// so a busy broker commits audit rows in tens rather than ones (the
	// audit path was 28 % of the broker's CPU at a paced 2,000 msg/s).
	// The first entry after a quiet spell is written at once.
	linger := time.Duration(0)
	if !a.db.IsPostgres() {
		linger = sqliteAuditLinger
	}
	var lastWrite time.Time
	for {
		select {
		case e := <-a.queue:
			if wait := linger - time.Since(lastWrite); wait > 0 {
				t := time.NewTimer(wait)
				select {
				case <-t.C:
				case <-a.stop:
					t.Stop()
				}
			}
			batch = a.fill(append(batch[:0], *e))
			a.write(batch)
			lastWrite = time.Now()
		case <-a.stop:
			for {
				batch = a.fill(batch[:0])
				if len(batch) == 0 {
					return
				}
				a.write(batch)
			}
		}
	}
}

// fill adds whatever is queued, up to maxAuditBatch, without waiting.
func (a *AuditService) fill(batch []auditEntry) []auditEntry {
	for len(batch) < maxAuditBatch {
		select {
		case e := <-a.queue:
			batch = append(batch, *e)
		default:
			return batch
		}
	}
	return batch
}

// write appends batch, one transaction per mesh. Every entry ends written or
// failed, so the pending gauge drops by the whole batch.
func (a *AuditService) write(batch []auditEntry) {
	defer a.metrics.AuditPending.Sub(float64(len(batch)))
	defer a.stalled.Store(false)
	for _, group := range groupByMesh(batch) {
		// On the embedded database a transaction holds its one connection
		// from the tail read to the commit, and sends wait behind it: keep
		// each one short (see sqliteStatementRows).
		chunk := len(group)
		if !a.db.IsPostgres() {
			chunk = sqliteAuditRowsPerTx
		}
		for len(group) > 0 {
			n := min(len(group), chunk)
			a.appendGroup(group[:n])
			group = group[n:]
		}
	}
}

// groupByMesh splits batch per mesh, keeping arrival order within each mesh
// (the chain order) and meshes in order of first appearance.
func groupByMesh(batch []auditEntry) [][]auditEntry {
	index := map[string]int{}
	var groups [][]auditEntry
	for _, e := range batch {
		i, ok := index[e.meshID]
		if !ok {
			i = len(groups)
			index[e.meshID] = i
			groups = append(groups, nil)
		}
		groups[i] = append(groups[i], e)
	}
	return groups
}

// appendGroup appends one mesh's entries, retrying once on failure. The
// retry goes entry by entry, so that one row the database refuses (its mesh
// was deleted meanwhile, or a "\u0000" that jsonb cannot store) does not take
// the rest of the batch with it.
func (a *AuditService) appendGroup(entries []auditEntry) {
	if a.ctx.Err() != nil {
		for _, e := range entries {
			a.fail(e, a.ctx.Err())
		}
		return
	}
	if err := a.appendTx(entries); err == nil {
		a.metrics.AuditWritten.Add(float64(len(entries)))
		return
	}
	for _, e := range entries {
		if a.ctx.Err() != nil {
			a.fail(e, a.ctx.Err())
			continue
		}
		if err := a.appendTx([]auditEntry{e}); err != nil {
			a.fail(e, err)
			continue
		}
		a.metrics.AuditWritten.Inc()
	}
}

var auditInsertColumns = []string{"mesh_id", "event_type", "actor_member_id", "actor_display_name", "payload", "prev_hash", "hash", "created_at"}

// appendTx appends entries, all of one mesh, to that mesh's chain in one
// transaction: lock, read the tail, hash in order, one multi-row INSERT.
// The rows' ids come from the identity column (AUTOINCREMENT on SQLite) in
// VALUES order, which is the order the hashes chain in.
func (a *AuditService) appendTx(entries []auditEntry) error {
	ctx, cancel := context.WithTimeout(a.ctx, auditTxTimeout)
	defer cancel()
	meshID := entries[0].meshID
	table := a.db.Table("audit_log")
	err := a.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if a.db.IsPostgres() {
			if err := tx.Exec("SELECT pg_advisory_xact_lock(?)", auditLockKey(meshID)).Error; err != nil {
				return fmt.Errorf("lock: %w", err)
			}
		}
		var tail []string
		if err := tx.Raw("SELECT hash FROM "+table+" WHERE mesh_id = ? ORDER BY id DESC LIMIT 1", meshID).Scan(&tail).Error; err != nil {
			return fmt.Errorf("read tail: %w", err)
		}
		prev := auditGenesis
		if len(tail) > 0 {
			prev = tail[0]
		}

		hashes := make([]string, len(entries))
		prevs := make([]string, len(entries))
		for i, e := range entries {
			prevs[i] = prev
			hashes[i] = ChainHash(prev, e.meshID, e.eventType, e.actorMemberID, e.payload, e.createdAt)
			prev = hashes[i]
		}
		query, args := auditInsert(a.db, table, entries, prevs, hashes)
		if err := tx.Exec(query, args...).Error; err != nil {
			return fmt.Errorf("insert: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("append %d audit entries for mesh %s: %w", len(entries), meshID, err)
	}
	return nil
}

// auditInsert builds the statement that appends entries in order. On
// Postgres it is one INSERT … SELECT FROM unnest over a text array per
// column (eight parameters for any batch; a VALUES list of 256 rows has
// 2,048 and was the writer's bottleneck, which let the queue overflow at
// 25,000 messages a second). The identity column numbers the rows in the
// order the SELECT yields them, ORDER BY ord: the chain order. SQLite gets
// a multi-row VALUES list, whose rowids follow the list.
func auditInsert(db *models.DB, table string, entries []auditEntry, prevs, hashes []string) (string, []any) {
	if db.IsPostgres() {
		cols := models.NewTextColumns(len(auditInsertColumns), len(entries))
		for i, e := range entries {
			cols.Add(models.Text(e.meshID), models.Text(e.eventType), e.actorMemberID, e.actorName, models.Text(string(e.payload)),
				&prevs[i], &hashes[i], models.TimestampText(e.createdAt))
		}
		return "INSERT INTO " + table + " (" + strings.Join(auditInsertColumns, ", ") + ")" +
			" SELECT u.mesh_id, u.event_type, u.actor_member_id, u.actor_display_name, u.payload::jsonb, u.prev_hash, u.hash, u.created_at::timestamp" +
			" FROM unnest(?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[]) WITH ORDINALITY" +
			" AS u(mesh_id, event_type, actor_member_id, actor_display_name, payload, prev_hash, hash, created_at, ord) ORDER BY u.ord", cols.Args()
	}
	var sb strings.Builder
	sb.WriteString("INSERT INTO " + table + " (" + strings.Join(auditInsertColumns, ", ") + ") VALUES ")
	placeholder := "(" + strings.TrimSuffix(strings.Repeat("?, ", len(auditInsertColumns)), ", ") + ")"
	args := make([]any, 0, len(entries)*len(auditInsertColumns))
	for i, e := range entries {
		if i > 0 {
			sb.WriteString(", ")
		}
		sb.WriteString(placeholder)
		args = append(args, e.meshID, e.eventType, e.actorMemberID, e.actorName, models.JSON(e.payload), prevs[i], hashes[i], e.createdAt)
	}
	return sb.String(), args
}

// auditLockKey is the advisory lock key of a mesh's chain, the reference's
// (04 §1.2): the first 8 bytes of SHA-256("audit:"+meshID), big-endian, top
// bit cleared so it is a non-negative bigint. Other processes writing the
// same chain use the same key; the migration lock (7473773831) is another.
func auditLockKey(meshID string) int64 { return advisoryLockKey("audit:" + meshID) }

// advisoryLockKey is a pg_advisory_xact_lock key for name: the first 8
// bytes of its SHA-256, big-endian, top bit cleared.
func advisoryLockKey(name string) int64 {
	sum := sha256.Sum256([]byte(name))
	return int64(binary.BigEndian.Uint64(sum[:8]) & math.MaxInt64)
}

// ChainHash is a row's hash (04 §1.3): lowercase hex SHA-256 of
// prevHash|meshID|eventType|actor|payload|createdAt, where actor is the
// member id or the four characters "null", payloadCanonical is
// CanonicalJSON of the payload and createdAt is formatted as protocol.ISO
// (milliseconds, Z). The display name and the row id are not covered.
func ChainHash(prevHash, meshID, eventType string, actorMemberID *string, payloadCanonical []byte, createdAt time.Time) string {
	actor := "null"
	if actorMemberID != nil {
		actor = *actorMemberID
	}
	h := sha256.New()
	for _, part := range []string{prevHash, "|", meshID, "|", eventType, "|", actor, "|"} {
		h.Write([]byte(part))
	}
	h.Write(payloadCanonical)
	h.Write([]byte("|" + protocol.ISO(createdAt)))
	return hex.EncodeToString(h.Sum(nil))
}

// AuditQuery is a validated audit_query. Start from NewAuditQuery, which
// holds the defaults, and set what the request gave.
type AuditQuery struct {
	// Limit is the page size. 0 returns no entries, only Total, as in the
	// reference. A negative limit means "no limit", which the reference
	// honours and meshbroker caps at MaxAuditQueryLimit, as it caps any
	// larger value (A3).
	Limit int
	// Offset skips that many rows, newest first; it must not be negative.
	Offset int
	// EventType filters by exact match; "" matches every event.
	EventType string
}

// NewAuditQuery is the query of an audit_query frame with no parameters.
func NewAuditQuery() AuditQuery { return AuditQuery{Limit: DefaultAuditQueryLimit} }

// Query lists meshID's entries newest first (04 §1.7). Errors are *Error
// with code audit_query_error; a database failure is logged here and
// answered with a generic message, so no database text reaches the client.
func (a *AuditService) Query(ctx context.Context, meshID string, q AuditQuery) (protocol.AuditResult, error) {
	if q.Offset < 0 {
		return protocol.AuditResult{}, newError(protocol.CodeAuditQueryError, "Failed query: offset must not be negative")
	}
	limit := q.Limit
	if limit < 0 || limit > MaxAuditQueryLimit {
		limit = MaxAuditQueryLimit
	}
	table := a.db.Table("audit_log")
	where := "mesh_id = ?"
	args := []any{meshID}
	if q.EventType != "" {
		where += " AND event_type = ?"
		args = append(args, q.EventType)
	}
	db := a.db.WithContext(ctx)

	var total int64
	if err := db.Raw("SELECT count(*) FROM "+table+" WHERE "+where, args...).Scan(&total).Error; err != nil {
		return protocol.AuditResult{}, a.readFailed(protocol.CodeAuditQueryError, "Failed query: audit log unavailable", meshID, fmt.Errorf("count: %w", err))
	}
	var rows []models.AuditLog
	if limit > 0 {
		err := db.Raw("SELECT id, event_type, actor_member_id, actor_display_name, payload, hash, created_at FROM "+table+
			" WHERE "+where+" ORDER BY id DESC LIMIT ? OFFSET ?", append(args, limit, q.Offset)...).Scan(&rows).Error
		if err != nil {
			return protocol.AuditResult{}, a.readFailed(protocol.CodeAuditQueryError, "Failed query: audit log unavailable", meshID, fmt.Errorf("select: %w", err))
		}
	}
	entries := make([]protocol.AuditEntry, 0, len(rows)) // [] rather than null on the wire
	for _, r := range rows {
		actor := "system"
		switch {
		case r.ActorDisplayName != nil && *r.ActorDisplayName != "":
			actor = *r.ActorDisplayName
		case r.ActorMemberID != nil && *r.ActorMemberID != "":
			actor = *r.ActorMemberID
		}
		payload := json.RawMessage(r.Payload)
		if len(payload) == 0 {
			payload = json.RawMessage("{}")
		}
		entries = append(entries, protocol.AuditEntry{
			ID: r.ID, EventType: r.EventType, Actor: actor, Payload: payload, Hash: r.Hash, CreatedAt: protocol.ISO(r.CreatedAt),
		})
	}
	return protocol.AuditResult{Type: "audit_result", Entries: entries, Total: total}, nil
}

// Verify walks meshID's chain in id order and reports the first row whose
// prev_hash is not the previous row's hash or whose hash does not match its
// columns (04 §1.8). Errors are *Error with code audit_verify_error; a
// database failure is logged here.
//
// Rows appended while Verify runs are checked too if they fall on a page not
// yet read; they chain onto what was read, so they never cause a false break.
func (a *AuditService) Verify(ctx context.Context, meshID string) (protocol.AuditVerifyResult, error) {
	table := a.db.Table("audit_log")
	db := a.db.WithContext(ctx)
	res := protocol.AuditVerifyResult{Type: "audit_verify_result", Valid: true}
	expected := auditGenesis
	// Below any id: the Postgres column is integer (int4), so a smaller
	// bound would not even encode.
	lastID := int64(math.MinInt32)
	for {
		var rows []models.AuditLog
		err := db.Raw("SELECT id, event_type, actor_member_id, payload, prev_hash, hash, created_at FROM "+table+
			" WHERE mesh_id = ? AND id > ? ORDER BY id LIMIT ?", meshID, lastID, auditVerifyPage).Scan(&rows).Error
		if err != nil {
			return protocol.AuditVerifyResult{}, a.readFailed(protocol.CodeAuditVerifyError, "audit log unavailable", meshID, fmt.Errorf("read chain: %w", err))
		}
		for i := range rows {
			r := &rows[i]
			res.Entries++
			if res.Valid && !auditRowValid(meshID, expected, r) {
				res.Valid = false
				res.BrokenAt = &r.ID
			}
			expected = r.Hash
		}
		if len(rows) < auditVerifyPage {
			return res, nil
		}
		lastID = rows[len(rows)-1].ID
		if !res.Valid {
			// Broken already: the rest only needs counting.
			var rest int64
			if err := db.Raw("SELECT count(*) FROM "+table+" WHERE mesh_id = ? AND id > ?", meshID, lastID).Scan(&rest).Error; err != nil {
				return protocol.AuditVerifyResult{}, a.readFailed(protocol.CodeAuditVerifyError, "audit log unavailable", meshID, fmt.Errorf("count: %w", err))
			}
			res.Entries += rest
			return res, nil
		}
	}
}

// auditRowValid checks one row against the previous row's hash. The stored
// payload is re-read and re-canonicalized: jsonb keeps neither key order nor
// number spelling, and canonical JSON makes insert-time and verify-time
// bytes equal.
func auditRowValid(meshID, expectedPrev string, r *models.AuditLog) bool {
	if r.PrevHash != expectedPrev {
		return false
	}
	payload, err := decodeJSONUseNumber(r.Payload)
	if err != nil {
		return false
	}
	canon, err := CanonicalJSON(payload)
	if err != nil {
		return false
	}
	if ChainHash(r.PrevHash, meshID, r.EventType, r.ActorMemberID, canon, r.CreatedAt) == r.Hash {
		return true
	}
	// A1b: the reference logs a send without priority as message_sent with
	// priority undefined; its insert-time text holds "priority":undefined,
	// which jsonb could not store. Only that text reproduces the hash.
	obj, ok := payload.(map[string]any)
	if r.EventType != "message_sent" || !ok {
		return false
	}
	if _, has := obj["priority"]; has {
		return false
	}
	obj["priority"] = jsUndefined{}
	canon, err = CanonicalJSON(obj)
	if err != nil {
		return false
	}
	return ChainHash(r.PrevHash, meshID, r.EventType, r.ActorMemberID, canon, r.CreatedAt) == r.Hash
}

// readFailed logs a database error of Query or Verify and returns the
// client-safe error that replaces it.
func (a *AuditService) readFailed(code protocol.Code, msg, meshID string, err error) error {
	a.log.Error("audit read failed", "mesh", meshID, "code", code, "err", err)
	return newError(code, msg)
}
