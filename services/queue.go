package services

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
)

// QueueService owns mesh.message_queue (02 §5): group-committed inserts,
// disjoint claims, delivery marks, claim releases and the sweepers.
//
// Concurrency: Insert hands its row to one of the writer goroutines over
// the inserts channel and waits for the commit; each writer takes every row
// waiting (up to maxBatch) and commits them with one multi-row INSERT, so a
// burst of sends from many sockets costs one round trip, not one each
// (02 §13). Delivered marks are batched by one goroutine, which lets
// marks without a waiter (push confirmations) gather for up to
// DeliveredFlush before one UPDATE commits them all: a mark lost in a
// crash only means a redelivery, and the interval bounds how many. Everything else
// is a plain query; the service has no other shared state. Stop closes
// the channels' producers out and waits for the writers to flush.
type QueueService struct {
	cfg     config.Config
	db      *models.DB
	log     *slog.Logger
	metrics *Metrics
	now     func() time.Time

	inserts   []chan *insertReq // one per writer; a sender's rows always go to the same one, in order
	delivered chan markReq
	stopOnce  sync.Once
	stop      chan struct{}
	wg        sync.WaitGroup
}

const (
	maxInsertBatch = 256
	maxMarkBatch   = 512
	claimBatch     = 256

	// sqliteStatementRows bounds the rows one background UPDATE touches on
	// the embedded database. Its one connection serializes every
	// statement, so a send's insert waits for whatever holds it: the
	// claim sweep's 512-row marks (30,000 rows every 15 s at 2,000 msg/s
	// to clients that never ack) held it 50-250 ms each on the shared
	// 2-core VM. Smaller statements let the inserts in between.
	sqliteStatementRows = 64
)

// statementRows is how many ids one mark or release statement carries.
func (q *QueueService) statementRows() int {
	if q.db.IsPostgres() {
		return maxMarkBatch
	}
	return sqliteStatementRows
}

// QueueRow is one mesh.message_queue row.
type QueueRow struct {
	ID                  string
	MeshID              string
	SenderMemberID      string
	SenderSessionPubkey *string
	TargetSpec          string
	Priority            string
	Nonce               string
	Ciphertext          string
	CreatedAt           time.Time
	DeliveredAt         *time.Time
	ClientMessageID     *string
	RequestFingerprint  *string
	ClaimedAt           *time.Time
	ClaimID             *string
	ClaimExpiresAt      *time.Time
}

type insertReq struct {
	row  *QueueRow
	done chan error
}

// markReq is one delivered mark; done (optional) learns when it committed.
// An empty id is a flush marker.
type markReq struct {
	id   string
	done chan error
}

// NewQueueService makes the queue; Start runs its writers.
func NewQueueService(cfg config.Config, db *models.DB, log *slog.Logger, metrics *Metrics, now func() time.Time) *QueueService {
	return &QueueService{
		cfg: cfg, db: db, log: log.With("svc", "queue"), metrics: metrics, now: now,
		delivered: make(chan markReq, 8192), stop: make(chan struct{}),
	}
}

// Start runs the insert writers and the delivered-mark writer. SQLite has
// one connection, so one insert writer; Postgres gets two so one batch
// commits while the next is built.
func (q *QueueService) Start() {
	writers := 1
	if q.db.IsPostgres() {
		writers = 4
	}
	q.inserts = make([]chan *insertReq, writers)
	for i := range writers {
		q.inserts[i] = make(chan *insertReq, 4096)
		q.wg.Add(1)
		go q.insertLoop(q.inserts[i])
	}
	q.wg.Add(1)
	go q.markLoop()
}

// Stop flushes pending inserts and marks and waits for the writers. Insert
// calls racing with Stop get an error instead of hanging.
func (q *QueueService) Stop() {
	q.stopOnce.Do(func() { close(q.stop) })
	q.wg.Wait()
}

var errQueueStopped = errors.New("queue stopped")

// Insert stores row and returns once it is committed (M2: an ack may
// follow).
func (q *QueueService) Insert(ctx context.Context, row *QueueRow) error {
	done, err := q.InsertAsync(ctx, row)
	if err != nil {
		return err
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		// The row may still commit; the caller must not ack it. A retried
		// send with the same client_message_id finds it.
		return ctx.Err()
	}
}

// InsertAsync hands row to its sender's writer and returns the channel that
// reports the commit. Rows of one sender commit in the order they were
// handed over.
func (q *QueueService) InsertAsync(ctx context.Context, row *QueueRow) (<-chan error, error) {
	req := &insertReq{row: row, done: make(chan error, 1)}
	ch := q.inserts[senderShard(row.SenderMemberID, len(q.inserts))]
	select {
	case ch <- req:
		return req.done, nil
	case <-q.stop:
		return nil, errQueueStopped
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func senderShard(memberID string, n int) int {
	if n == 1 {
		return 0
	}
	h := fnv.New32a()
	h.Write([]byte(memberID))
	return int(h.Sum32() % uint32(n))
}

func (q *QueueService) insertLoop(inserts chan *insertReq) {
	defer q.wg.Done()
	batch := make([]*insertReq, 0, maxInsertBatch)
	for {
		var first *insertReq
		select {
		case first = <-inserts:
		case <-q.stop:
			// Flush what is already queued, then exit.
			for {
				select {
				case r := <-inserts:
					batch = append(batch[:0], r)
					q.commit(batch)
				default:
					return
				}
			}
		}
		batch = append(batch[:0], first)
	fill:
		for len(batch) < maxInsertBatch {
			select {
			case r := <-inserts:
				batch = append(batch, r)
			default:
				break fill
			}
		}
		q.commit(batch)
	}
}

var queueColumns = []string{"id", "mesh_id", "sender_member_id", "sender_session_pubkey", "target_spec", "priority", "nonce", "ciphertext",
	"created_at", "delivered_at", "client_message_id", "request_fingerprint", "claimed_at", "claim_id", "claim_expires_at"}

func (q *QueueService) commit(batch []*insertReq) {
	q.metrics.QueueBatchSize.Observe(float64(len(batch)))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := q.insertRows(ctx, batch)
	if err != nil && len(batch) > 1 {
		// One bad row (a mesh deleted meanwhile, say) must not fail the
		// others: retry them one by one.
		for _, r := range batch {
			r.done <- q.insertRows(ctx, []*insertReq{r})
		}
		return
	}
	for _, r := range batch {
		r.done <- err
	}
}

// InsertWithin commits row in one transaction with before, which runs
// first; an error from before rolls back and is returned unchanged.
func (q *QueueService) InsertWithin(ctx context.Context, row *QueueRow, before func(tx *gorm.DB) error) error {
	return q.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if err := before(tx); err != nil {
			return err
		}
		return q.insertWith(ctx, tx, row)
	})
}

// insertWith inserts one row inside the caller's transaction (topic posts,
// whose queue row and topic_message row commit together).
func (q *QueueService) insertWith(ctx context.Context, tx *gorm.DB, row *QueueRow) error {
	return q.insertRowsOn(tx.WithContext(ctx), []*insertReq{{row: row}})
}

func (q *QueueService) insertRows(ctx context.Context, batch []*insertReq) error {
	return q.insertRowsOn(q.db.WithContext(ctx), batch)
}

func (q *QueueService) insertRowsOn(db *gorm.DB, batch []*insertReq) error {
	var sb strings.Builder
	sb.WriteString("INSERT INTO " + q.db.Table("message_queue") + " (" + strings.Join(queueColumns, ", ") + ") VALUES ")
	args := make([]any, 0, len(batch)*len(queueColumns))
	placeholder := "(" + strings.TrimSuffix(strings.Repeat("?, ", len(queueColumns)), ", ") + ")"
	for i, r := range batch {
		if i > 0 {
			sb.WriteString(", ")
		}
		sb.WriteString(placeholder)
		w := r.row
		args = append(args, w.ID, w.MeshID, w.SenderMemberID, w.SenderSessionPubkey, w.TargetSpec, w.Priority, w.Nonce, w.Ciphertext,
			w.CreatedAt.UTC(), utcPtr(w.DeliveredAt), w.ClientMessageID, w.RequestFingerprint, utcPtr(w.ClaimedAt), w.ClaimID, utcPtr(w.ClaimExpiresAt))
	}
	if err := db.Exec(sb.String(), args...).Error; err != nil {
		return fmt.Errorf("insert %d queue rows: %w", len(batch), err)
	}
	return nil
}

func utcPtr(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	u := t.UTC()
	return &u
}

// MarkDeliveredAsync queues a delivered mark for a row this broker pushed
// and whose target the acker was entitled to; the mark loop batches them.
func (q *QueueService) MarkDeliveredAsync(id string) {
	select {
	case q.delivered <- markReq{id: id}:
	case <-q.stop:
	}
}

// MarkDeliveredWait is MarkDeliveredAsync that returns once the mark is
// committed, batched with every other mark waiting at the time.
func (q *QueueService) MarkDeliveredWait(ctx context.Context, id string) error {
	req := markReq{id: id, done: make(chan error, 1)}
	select {
	case q.delivered <- req:
	case <-q.stop:
		return errQueueStopped
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (q *QueueService) markLoop() {
	defer q.wg.Done()
	batch := make([]markReq, 0, maxMarkBatch)
	ids := make([]string, 0, maxMarkBatch)
	flush := func() {
		if len(batch) == 0 {
			return
		}
		ids = ids[:0]
		for _, r := range batch {
			if r.id != "" {
				ids = append(ids, r.id)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		n, err := q.MarkDelivered(ctx, ids)
		cancel()
		if err != nil {
			q.log.Error("mark delivered", "rows", len(ids), "err", err)
		}
		q.metrics.DeliveredOnce.Add(float64(n))
		for _, r := range batch {
			if r.done != nil {
				r.done <- err
			}
		}
		batch = batch[:0]
	}
	// Marks without a waiter (push confirmations) linger up to
	// DeliveredFlush so one UPDATE carries many; a waiter (client_ack, a
	// flush) commits everything pending at once.
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	lingering := false
	add := func(r markReq) (now bool) {
		batch = append(batch, r)
		return r.done != nil || len(batch) >= maxMarkBatch
	}
	for {
		select {
		case r := <-q.delivered:
			now := add(r)
		fill:
			for !now {
				select {
				case r := <-q.delivered:
					now = add(r)
				default:
					break fill
				}
			}
			if now || q.cfg.DeliveredFlush <= 0 {
				if lingering {
					linger.Stop()
					lingering = false
				}
				flush()
			} else if !lingering {
				linger.Reset(q.cfg.DeliveredFlush)
				lingering = true
			}
		case <-linger.C:
			lingering = false
			flush()
		case <-q.stop:
			for {
				select {
				case r := <-q.delivered:
					batch = append(batch, r)
				default:
					flush()
					return
				}
			}
		}
	}
}

// FlushMarks returns once every delivered mark queued before it is
// committed (shutdown persists confirmations before closing sockets).
func (q *QueueService) FlushMarks(ctx context.Context) error {
	req := markReq{done: make(chan error, 1)}
	select {
	case q.delivered <- req:
	case <-q.stop:
		return errQueueStopped
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// MarkDelivered sets delivered_at on undelivered rows by id.
func (q *QueueService) MarkDelivered(ctx context.Context, ids []string) (int64, error) {
	var total int64
	now := q.now().UTC()
	for len(ids) > 0 {
		n := min(len(ids), q.statementRows())
		res := q.db.WithContext(ctx).Exec("UPDATE "+q.db.Table("message_queue")+" SET delivered_at = ? WHERE id IN ? AND delivered_at IS NULL", now, ids[:n])
		if res.Error != nil {
			return total, fmt.Errorf("mark %d rows delivered: %w", n, res.Error)
		}
		total += res.RowsAffected
		ids = ids[n:]
	}
	return total, nil
}

// AckByClient is client_ack's general form (02 §7.1): any undelivered row
// of the mesh with that broker id or client id whose target the acker may
// close (its member or session key, `*`, `@…`, `#…`).
func (q *QueueService) AckByClient(ctx context.Context, meshID, brokerID, clientID, memberKey, sessionKey string) (int64, error) {
	var idCond string
	var args []any
	args = append(args, q.now().UTC(), meshID)
	switch {
	case brokerID != "" && clientID != "":
		idCond, args = "(id = ? OR client_message_id = ?)", append(args, brokerID, clientID)
	case brokerID != "":
		idCond, args = "id = ?", append(args, brokerID)
	default:
		idCond, args = "client_message_id = ?", append(args, clientID)
	}
	keys := []string{memberKey, "*"}
	if sessionKey != "" {
		keys = append(keys, sessionKey)
	}
	args = append(args, keys)
	res := q.db.WithContext(ctx).Exec("UPDATE "+q.db.Table("message_queue")+" SET delivered_at = ? WHERE mesh_id = ? AND delivered_at IS NULL AND "+idCond+
		" AND (target_spec IN ? OR target_spec LIKE '@%' OR target_spec LIKE '#%')", args...)
	if res.Error != nil {
		return 0, fmt.Errorf("client ack: %w", res.Error)
	}
	return res.RowsAffected, nil
}

// Release clears the claims of rows that were claimed but not delivered to
// a socket that is gone, so the next drain takes them at once (D2).
func (q *QueueService) Release(ctx context.Context, ids []string) error {
	for len(ids) > 0 {
		n := min(len(ids), q.statementRows())
		err := q.db.WithContext(ctx).Exec("UPDATE "+q.db.Table("message_queue")+" SET claimed_at = NULL, claim_id = NULL, claim_expires_at = NULL WHERE id IN ? AND delivered_at IS NULL", ids[:n]).Error
		if err != nil {
			return fmt.Errorf("release %d claims: %w", n, err)
		}
		ids = ids[n:]
	}
	return nil
}

// ClaimRequest describes one drain (02 §5.3).
type ClaimRequest struct {
	MeshID     string
	Targets    []string // member key, session key, `*`, `@all`, `@group` prefixes, `#topic` of the member's topics
	Priorities []string
	Claimer    string // presence id
	Limit      int
}

// ClaimedRow is a row a drain took, ready to push.
type ClaimedRow struct {
	ID                  string
	SenderMemberID      string
	SenderSessionPubkey *string
	TargetSpec          string
	Priority            string
	Nonce               string
	Ciphertext          string
	CreatedAt           time.Time
	ClientMessageID     *string
	RequestFingerprint  *string
}

// Claim atomically takes up to req.Limit eligible rows, oldest first.
// Concurrent claims never return the same row: Postgres skips locked rows
// and SQLite serializes writers.
func (q *QueueService) Claim(ctx context.Context, req ClaimRequest) ([]ClaimedRow, error) {
	now := q.now().UTC()
	mq := q.db.Table("message_queue")
	// One flat target list keeps the partial (mesh_id, target_spec,
	// created_at) index usable: an OR with a subquery made every claim scan
	// all undelivered rows of the mesh.
	where := "mesh_id = ? AND delivered_at IS NULL AND (claimed_at IS NULL OR claim_expires_at IS NULL OR claim_expires_at < ?)" +
		" AND %s IN ? AND target_spec IN ?"
	returning := " RETURNING id, sender_member_id, sender_session_pubkey, target_spec, priority, nonce, ciphertext, created_at, client_message_id, request_fingerprint"
	limit := req.Limit
	if limit <= 0 {
		limit = claimBatch
	}
	args := []any{now, req.Claimer, now.Add(q.cfg.ClaimLease), req.MeshID, now, req.Priorities, req.Targets, limit}
	var sql string
	if q.db.IsPostgres() {
		sql = "WITH picked AS (SELECT id FROM " + mq + " WHERE " + fmt.Sprintf(where, "priority::text") +
			" ORDER BY created_at, id LIMIT ? FOR UPDATE SKIP LOCKED)" +
			" UPDATE " + mq + " SET claimed_at = ?, claim_id = ?, claim_expires_at = ? WHERE id IN (SELECT id FROM picked)" + returning
		args = append(args[3:], args[:3]...)
	} else {
		sql = "UPDATE " + mq + " SET claimed_at = ?, claim_id = ?, claim_expires_at = ? WHERE id IN (SELECT id FROM " + mq + " WHERE " +
			fmt.Sprintf(where, "priority") + " ORDER BY created_at, id LIMIT ?)" + returning
	}
	var rows []ClaimedRow
	if err := q.db.WithContext(ctx).Raw(sql, args...).Scan(&rows).Error; err != nil {
		return nil, fmt.Errorf("claim for %s: %w", req.Claimer, err)
	}
	// RETURNING does not keep the subquery's order.
	slices.SortFunc(rows, func(a, b ClaimedRow) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	for _, r := range rows {
		q.metrics.ClaimAge.Observe(now.Sub(r.CreatedAt).Seconds())
	}
	return rows, nil
}

// TopicTargets returns `#<topicId>` for every topic the member belongs to.
func (q *QueueService) TopicTargets(ctx context.Context, memberID string) ([]string, error) {
	var ids []string
	if err := q.db.WithContext(ctx).Raw("SELECT topic_id FROM "+q.db.Table("topic_member")+" WHERE member_id = ?", memberID).Scan(&ids).Error; err != nil {
		return nil, fmt.Errorf("topics of member %s: %w", memberID, err)
	}
	for i, id := range ids {
		ids[i] = "#" + id
	}
	return ids, nil
}

// ExpiredClaim is a (mesh, target) whose undelivered rows had a claim run out.
type ExpiredClaim struct {
	MeshID     string
	TargetSpec string
}

// ReapExpired clears claims that expired before cutoff (the reaper of
// 02 §5.5) and returns which targets had any, so their connections can
// drain again (D4).
func (q *QueueService) ReapExpired(ctx context.Context, cutoff time.Time) ([]ExpiredClaim, error) {
	var rows []ExpiredClaim
	err := q.db.WithContext(ctx).Raw("UPDATE "+q.db.Table("message_queue")+" SET claimed_at = NULL, claim_id = NULL, claim_expires_at = NULL"+
		" WHERE delivered_at IS NULL AND claim_expires_at < ? RETURNING mesh_id, target_spec", cutoff.UTC()).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("reap expired claims: %w", err)
	}
	seen := map[ExpiredClaim]bool{}
	out := rows[:0]
	for _, r := range rows {
		if !seen[r] {
			seen[r] = true
			out = append(out, r)
		}
	}
	return out, nil
}

// SweepOrphans deletes undelivered rows older than OrphanAge.
func (q *QueueService) SweepOrphans(ctx context.Context) (int64, error) {
	res := q.db.WithContext(ctx).Exec("DELETE FROM "+q.db.Table("message_queue")+" WHERE delivered_at IS NULL AND created_at < ?", q.now().Add(-q.cfg.OrphanAge).UTC())
	if res.Error != nil {
		return 0, fmt.Errorf("sweep orphans: %w", res.Error)
	}
	return res.RowsAffected, nil
}

// Depth counts undelivered rows, for broker_queue_depth.
func (q *QueueService) Depth(ctx context.Context) (int64, error) {
	var n int64
	if err := q.db.WithContext(ctx).Raw("SELECT count(*) FROM " + q.db.Table("message_queue") + " WHERE delivered_at IS NULL").Scan(&n).Error; err != nil {
		return 0, fmt.Errorf("queue depth: %w", err)
	}
	return n, nil
}

// ByClientID finds the row a member already stored under a client id.
func (q *QueueService) ByClientID(ctx context.Context, meshID, memberID, clientID string) (*QueueRow, error) {
	var rows []QueueRow
	err := q.db.WithContext(ctx).Raw("SELECT id, request_fingerprint FROM "+q.db.Table("message_queue")+
		" WHERE mesh_id = ? AND client_message_id = ? AND sender_member_id = ? LIMIT 1", meshID, clientID, memberID).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("look up client_message_id: %w", err)
	}
	if len(rows) == 0 {
		return nil, nil
	}
	return &rows[0], nil
}

// Lookup returns up to two rows of the mesh whose id is id (len 32) or
// starts with it, for message_status.
func (q *QueueService) Lookup(ctx context.Context, meshID, id string) ([]QueueRow, error) {
	var rows []QueueRow
	cols := "id, target_spec, delivered_at"
	var err error
	if len(id) == 32 {
		err = q.db.WithContext(ctx).Raw("SELECT "+cols+" FROM "+q.db.Table("message_queue")+" WHERE mesh_id = ? AND id = ? LIMIT 2", meshID, id).Scan(&rows).Error
	} else {
		err = q.db.WithContext(ctx).Raw("SELECT "+cols+" FROM "+q.db.Table("message_queue")+" WHERE mesh_id = ? AND id LIKE ? LIMIT 2", meshID, id+"%").Scan(&rows).Error
	}
	if err != nil {
		return nil, fmt.Errorf("message status lookup: %w", err)
	}
	return rows, nil
}
