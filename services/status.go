package services

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
)

// StatusService owns presence status (idle, working, dnd), its source (hook,
// manual, jsonl), the parked hook statuses in pending_status, and the
// sweepers of 03 §2-§5.
//
// It keeps an in-memory copy of the status of every presence this process
// holds, written through to mesh.presence by the single write path
// (writeStatus), so that the status gate of a drain costs no query. A hook
// that another broker instance applies to one of our presences is not seen
// here until our next write; one instance per mesh is the supported setup,
// as for the registry itself.
//
// Concurrency: recs is guarded by mu, and so is every record in it. Database
// writes happen outside mu with values copied under it; a write for one
// presence is serialized by its record's writeMu so two writers cannot
// reorder their database updates.
type StatusService struct {
	cfg      config.Config
	db       *models.DB
	log      *slog.Logger
	metrics  *Metrics
	now      func() time.Time
	hookAddr *Limiters[netip.Prefix] // hook requests per remote address (IPv6 per /64)
	hookKey  *Limiters[hookKey]      // hook requests per (pid, cwd), by digest

	parkMu sync.Mutex // serializes parking, so HookPendingMax holds exactly for one process

	onRelax func(presenceID string) // set during wiring: drain held messages

	mu   sync.Mutex
	recs map[string]*statusRecord
}

type statusRecord struct {
	writeMu   sync.Mutex // serializes database writes for this presence
	status    string
	source    string
	updatedAt time.Time
}

// Status values and sources.
const (
	StatusIdle    = "idle"
	StatusWorking = "working"
	StatusDND     = "dnd"

	SourceHook   = "hook"
	SourceManual = "manual"
	SourceJSONL  = "jsonl"
)

// ValidStatus reports whether s is one of the three statuses (S1).
func ValidStatus(s string) bool { return s == StatusIdle || s == StatusWorking || s == StatusDND }

func sourceRank(s string) int {
	switch s {
	case SourceHook:
		return 3
	case SourceManual:
		return 2
	case SourceJSONL:
		return 1
	}
	return 0
}

// NewStatusService makes the status service.
func NewStatusService(cfg config.Config, db *models.DB, log *slog.Logger, metrics *Metrics, now func() time.Time) *StatusService {
	return &StatusService{
		cfg: cfg, db: db, log: log.With("svc", "status"), metrics: metrics, now: now,
		hookAddr: NewLimiters[netip.Prefix](cfg.HookAddrRateLimit, cfg.HookAddrRateLimit, hookLimiterKeys),
		hookKey:  NewLimiters[hookKey](cfg.HookRateLimitPerMin, cfg.HookRateLimitPerMin, hookLimiterKeys),
		recs:     map[string]*statusRecord{},
	}
}

// OnRelax sets the callback run when a presence's status relaxes (working
// or dnd to idle, dnd to working), so held messages drain (S3). Wiring only.
func (s *StatusService) OnRelax(fn func(presenceID string)) { s.onRelax = fn }

// Track starts mirroring a new presence whose row was just inserted as
// idle/jsonl at now.
func (s *StatusService) Track(presenceID string, at time.Time) {
	s.mu.Lock()
	s.recs[presenceID] = &statusRecord{status: StatusIdle, source: SourceJSONL, updatedAt: at}
	s.mu.Unlock()
}

// TrackRestored starts mirroring a presence restored from the database at
// start (durable leases) with the status its row holds.
func (s *StatusService) TrackRestored(presenceID, status, source string, updatedAt time.Time) {
	if !ValidStatus(status) {
		status = StatusIdle
	}
	s.mu.Lock()
	s.recs[presenceID] = &statusRecord{status: status, source: source, updatedAt: updatedAt}
	s.mu.Unlock()
}

// Forget stops mirroring an evicted presence.
func (s *StatusService) Forget(presenceID string) {
	s.mu.Lock()
	delete(s.recs, presenceID)
	s.mu.Unlock()
}

// Current returns the mirrored status, or idle for an unknown presence.
func (s *StatusService) Current(presenceID string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r := s.recs[presenceID]; r != nil {
		return r.status
	}
	return StatusIdle
}

func (s *StatusService) fresh(r *statusRecord, now time.Time) bool {
	age := now.Sub(r.updatedAt)
	return age >= 0 && age <= s.cfg.HookFreshWindow
}

// Effective is the status a drain gates on (02 §3.1, 03 §4): dnd stays dnd;
// a fresh hook status holds; anything else is inferred, and inference on a
// broker that does not share the sessions' disk always yields idle (S5),
// which is written back with source jsonl like the reference does.
func (s *StatusService) Effective(ctx context.Context, presenceID string) string {
	now := s.now()
	s.mu.Lock()
	r := s.recs[presenceID]
	if r == nil {
		s.mu.Unlock()
		return StatusIdle
	}
	st, src := r.status, r.source
	hookFresh := src == SourceHook && s.fresh(r, now)
	s.mu.Unlock()
	switch {
	case st == StatusDND:
		return StatusDND
	case hookFresh:
		return st
	}
	// Inferred idle. Only a change of value or label is written: refreshing
	// status_updated_at on every drain would cost a write per message and
	// shows nowhere on the wire.
	if st != StatusIdle || src != SourceJSONL {
		if _, err := s.write(ctx, presenceID, StatusIdle, SourceJSONL, now); err != nil {
			s.log.Warn("write inferred status", "presence_id", presenceID, "err", err)
		}
	}
	return StatusIdle
}

// write is writeStatus (03 §2) for a presence this process mirrors: it
// decides from the mirror, updates it and the row. It reports whether the
// status relaxed.
func (s *StatusService) write(ctx context.Context, presenceID, newStatus, source string, now time.Time) (relaxed bool, err error) {
	s.mu.Lock()
	r := s.recs[presenceID]
	s.mu.Unlock()
	if r == nil {
		return false, s.writeRow(ctx, presenceID, newStatus, source, now)
	}
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	s.mu.Lock()
	old := r.status
	setStatus, setSource := r.status, r.source
	switch {
	case newStatus != r.status:
		setStatus, setSource = newStatus, source
	case sourceRank(source) >= sourceRank(r.source):
		setSource = source
	case s.fresh(r, now):
		// weaker source, same status, stronger label still fresh: keep the label
	default:
		setSource = source
	}
	s.mu.Unlock()
	// The mirror follows the row, never leads it: a failed update leaves
	// both as they were (writeMu keeps the decision above valid meanwhile).
	err = s.db.WithContext(ctx).Exec("UPDATE "+s.db.Table("presence")+" SET status = ?, status_source = ?, status_updated_at = ? WHERE id = ?",
		setStatus, setSource, now.UTC(), presenceID).Error
	if err != nil {
		return false, fmt.Errorf("write status of %s: %w", presenceID, err)
	}
	s.mu.Lock()
	r.status, r.source, r.updatedAt = setStatus, setSource, now
	s.mu.Unlock()
	return relaxes(old, setStatus), nil
}

func relaxes(from, to string) bool {
	return (from == StatusWorking || from == StatusDND) && to == StatusIdle || from == StatusDND && to == StatusWorking
}

// writeRow is writeStatus for a row this process does not mirror: read the
// row, decide, update.
func (s *StatusService) writeRow(ctx context.Context, presenceID, newStatus, source string, now time.Time) error {
	var rows []struct {
		Status          string
		StatusSource    string
		StatusUpdatedAt time.Time
	}
	tbl := s.db.Table("presence")
	if err := s.db.WithContext(ctx).Raw("SELECT status, status_source, status_updated_at FROM "+tbl+" WHERE id = ?", presenceID).Scan(&rows).Error; err != nil {
		return fmt.Errorf("read status of %s: %w", presenceID, err)
	}
	if len(rows) == 0 {
		return nil
	}
	row := rows[0]
	setStatus, setSource := row.Status, row.StatusSource
	rec := &statusRecord{status: row.Status, source: row.StatusSource, updatedAt: row.StatusUpdatedAt}
	switch {
	case newStatus != row.Status:
		setStatus, setSource = newStatus, source
	case sourceRank(source) >= sourceRank(row.StatusSource):
		setSource = source
	case s.fresh(rec, now):
	default:
		setSource = source
	}
	if err := s.db.WithContext(ctx).Exec("UPDATE "+tbl+" SET status = ?, status_source = ?, status_updated_at = ? WHERE id = ?",
		setStatus, setSource, now.UTC(), presenceID).Error; err != nil {
		return fmt.Errorf("write status of %s: %w", presenceID, err)
	}
	return nil
}

// SetManual is `set_status` over the socket (03 §6.1): manual source, the
// only way out of dnd. A relaxation drains held messages (S3).
func (s *StatusService) SetManual(ctx context.Context, presenceID, status string) error {
	relaxed, err := s.write(ctx, presenceID, status, SourceManual, s.now())
	if err != nil {
		return err
	}
	if relaxed && s.onRelax != nil {
		s.onRelax(presenceID)
	}
	return nil
}

// ApplyPending applies the newest parked hook status for (pid, cwd) younger
// than PendingStatusTTL to a presence that was just created (03 §3.3).
func (s *StatusService) ApplyPending(ctx context.Context, presenceID string, pid int, cwd string) error {
	now := s.now()
	tbl := s.db.Table("pending_status")
	var rows []struct {
		ID     string
		Status string
	}
	err := s.db.WithContext(ctx).Raw("SELECT id, status FROM "+tbl+" WHERE pid = ? AND cwd = ? AND applied_at IS NULL AND created_at >= ? ORDER BY created_at DESC LIMIT 1",
		pid, cwd, now.Add(-s.cfg.PendingStatusTTL).UTC()).Scan(&rows).Error
	if err != nil {
		return fmt.Errorf("look up pending status for pid %d: %w", pid, err)
	}
	if len(rows) == 0 || !ValidStatus(rows[0].Status) {
		return nil
	}
	if _, err := s.write(ctx, presenceID, rows[0].Status, SourceHook, now); err != nil {
		return err
	}
	if err := s.db.WithContext(ctx).Exec("UPDATE "+tbl+" SET applied_at = ? WHERE id = ?", now.UTC(), rows[0].ID).Error; err != nil {
		return fmt.Errorf("mark pending status applied: %w", err)
	}
	return nil
}

// HookRequest is the body of POST /hook/set-status.
type HookRequest struct {
	Cwd    string
	Pid    int
	Status string
}

// HookResult is what the hook route answers with 200.
type HookResult struct {
	PresenceID string // set when a presence matched
	Pending    bool   // parked in pending_status
}

// The hook route is unauthenticated, so everything it keeps is bounded
// (issue 13): a cwd longer than a path can be is refused before anything is
// kept for it; buckets are keyed by fixed-size values (a remote address
// prefix, a digest of pid and cwd), at most hookLimiterKeys of each, and
// dropped once refilled (within a minute at the defaults); parked statuses
// are one row per (pid, cwd), at most HookPendingMax rows in all.

// MaxHookCwdBytes is the longest cwd the hook route accepts: PATH_MAX.
const MaxHookCwdBytes = 4096

// hookLimiterKeys bounds each of the hook route's bucket sets.
const hookLimiterKeys = 16_384

// hookKey is the digest of "<pid>:<cwd>" that keys a hook bucket.
type hookKey [16]byte

// ErrPendingFull is returned by Hook when parking the status would exceed
// HookPendingMax rows.
var ErrPendingFull = newError("rate_limited", "too many pending statuses")

// HookAddrAllowed spends one token of the remote address's bucket. IPv6
// addresses share a bucket per /64, the block one subscriber gets.
func (s *StatusService) HookAddrAllowed(addr netip.Addr) bool {
	addr = addr.Unmap()
	bits := 32
	if addr.Is6() {
		bits = 64
	}
	prefix, err := addr.Prefix(bits)
	if err != nil { // not an address: all such requests share one bucket
		prefix = netip.Prefix{}
	}
	return s.hookAddr.Take(prefix, s.now())
}

// HookAllowed spends one token of the (pid, cwd) bucket (03 §3.2 step 4).
func (s *StatusService) HookAllowed(pid int, cwd string) bool {
	sum := sha256.Sum256([]byte(strconv.Itoa(pid) + ":" + cwd))
	return s.hookKey.Take(hookKey(sum[:16]), s.now())
}

// Hook applies a Claude Code hook report (03 §3.2 steps 6-10). The caller
// has validated cwd and status and spent the rate-limit token.
func (s *StatusService) Hook(ctx context.Context, req HookRequest) (HookResult, error) {
	now := s.now()
	tbl := s.db.Table("presence")
	type match struct {
		ID     string
		Status string
	}
	var rows []match
	if req.Pid != 0 {
		if err := s.db.WithContext(ctx).Raw("SELECT id, status FROM "+tbl+" WHERE disconnected_at IS NULL AND cwd = ? AND pid = ? LIMIT 1", req.Cwd, req.Pid).Scan(&rows).Error; err != nil {
			return HookResult{}, fmt.Errorf("hook lookup by pid: %w", err)
		}
	}
	if len(rows) == 0 {
		if err := s.db.WithContext(ctx).Raw("SELECT id, status FROM "+tbl+" WHERE disconnected_at IS NULL AND cwd = ? ORDER BY connected_at DESC LIMIT 1", req.Cwd).Scan(&rows).Error; err != nil {
			return HookResult{}, fmt.Errorf("hook lookup by cwd: %w", err)
		}
	}
	if len(rows) == 0 {
		if err := s.park(ctx, req, now); err != nil {
			return HookResult{}, err
		}
		return HookResult{Pending: true}, nil
	}
	id := rows[0].ID
	current := rows[0].Status
	s.mu.Lock()
	if r := s.recs[id]; r != nil {
		current = r.status
	}
	s.mu.Unlock()
	if current != StatusDND { // a hook never touches dnd, not even to set dnd again
		if _, err := s.write(ctx, id, req.Status, SourceHook, now); err != nil {
			return HookResult{}, err
		}
	}
	return HookResult{PresenceID: id}, nil
}

// park stores a hook status for a presence that does not exist yet (03
// §3.3). Only the newest status per (pid, cwd) can ever apply, so it
// replaces an earlier row of the same pair instead of adding one; a new
// pair is inserted only while the table holds fewer than HookPendingMax
// rows (expired rows count until the sweeper deletes them, so the bound is
// on the table, not on a window). Within one process parkMu makes the
// count and the insert one step; broker instances sharing a database can
// overshoot by one row each at most.
func (s *StatusService) park(ctx context.Context, req HookRequest, now time.Time) error {
	tbl := s.db.Table("pending_status")
	s.parkMu.Lock()
	defer s.parkMu.Unlock()
	res := s.db.WithContext(ctx).Exec("UPDATE "+tbl+" SET status = ?, status_source = ?, created_at = ?, applied_at = NULL WHERE pid = ? AND cwd = ?",
		req.Status, SourceHook, now.UTC(), req.Pid, req.Cwd)
	if res.Error != nil {
		return fmt.Errorf("park hook status: %w", res.Error)
	}
	if res.RowsAffected > 0 {
		return nil
	}
	values := "?, ?, ?, ?, ?, ?" // SQLite: a CAST to timestamp would make the time a number
	if s.db.Dialect == models.DialectPostgres {
		values = "?, CAST(? AS integer), ?, ?, ?, CAST(? AS timestamp)" // a bare parameter in a SELECT list is text
	}
	res = s.db.WithContext(ctx).Exec("INSERT INTO "+tbl+" (id, pid, cwd, status, status_source, created_at)"+
		" SELECT "+values+" WHERE (SELECT count(*) FROM "+tbl+") < ?",
		models.NewID(), req.Pid, req.Cwd, req.Status, SourceHook, now.UTC(), s.cfg.HookPendingMax)
	if res.Error != nil {
		return fmt.Errorf("park hook status: %w", res.Error)
	}
	if res.RowsAffected == 0 {
		return ErrPendingFull
	}
	return nil
}

// SweepTTL flips `working` rows older than StatusTTL to idle/jsonl (03 §5)
// and drains the ones this process holds (S3). It returns how many flipped.
func (s *StatusService) SweepTTL(ctx context.Context) (int, error) {
	now := s.now()
	var ids []string
	err := s.db.WithContext(ctx).Raw("SELECT id FROM "+s.db.Table("presence")+" WHERE disconnected_at IS NULL AND status = ? AND status_updated_at < ?",
		StatusWorking, now.Add(-s.cfg.StatusTTL).UTC()).Scan(&ids).Error
	if err != nil {
		return 0, fmt.Errorf("ttl sweep: %w", err)
	}
	flipped := 0
	for _, id := range ids {
		relaxed, err := s.write(ctx, id, StatusIdle, SourceJSONL, now)
		if err != nil {
			return flipped, err
		}
		flipped++
		if relaxed && s.onRelax != nil {
			s.onRelax(id)
		}
	}
	s.metrics.TTLSweeps.WithLabelValues(strconv.Itoa(flipped)).Inc()
	return flipped, nil
}

// SweepPending deletes parked statuses that expired or were applied.
func (s *StatusService) SweepPending(ctx context.Context) error {
	err := s.db.WithContext(ctx).Exec("DELETE FROM "+s.db.Table("pending_status")+" WHERE created_at < ? OR applied_at IS NOT NULL",
		s.now().Add(-s.cfg.PendingStatusTTL).UTC()).Error
	if err != nil {
		return fmt.Errorf("sweep pending status: %w", err)
	}
	return nil
}

// GCBuckets drops hook rate-limit buckets that have refilled.
func (s *StatusService) GCBuckets() {
	now := s.now()
	s.hookAddr.Sweep(now)
	s.hookKey.Sweep(now)
}

// HookBuckets is how many hook rate-limit buckets are kept (per address,
// per key), for tests and metrics.
func (s *StatusService) HookBuckets() (perAddr, perKey int) { return s.hookAddr.Len(), s.hookKey.Len() }
