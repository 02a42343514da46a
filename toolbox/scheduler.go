package toolbox

import (
	"context"
	"encoding/base64"
	"errors"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/config"
)

// Dispatch is one due schedule handed to the send path.
type Dispatch struct {
	MeshID     string
	MemberID   string
	TargetSpec string
	Ciphertext string // the body, base64; the nonce is empty
	// Claim must run in the transaction that stores the message; when it
	// fails, nothing may be stored and its error must come back wrapped.
	Claim func(tx *gorm.DB) error
}

// Outcome is what the send path did with a Dispatch. Queued false means
// nothing was stored and Claim did not run.
type Outcome struct {
	Queued     bool
	Rejection  string
	SenderGone bool
}

// Sender is the normal send path, sending as the schedule's creator.
type Sender interface {
	SendScheduled(ctx context.Context, d Dispatch) (Outcome, error)
}

// fireWorkers bounds the fires of one round that run at once.
const fireWorkers = 8

// retryAfter is the least wait after a round in which a fire failed.
const retryAfter = time.Second

// errClaimed is a claim that matched no row: another broker fired the
// schedule first, or it was cancelled meanwhile.
var errClaimed = errors.New("scheduled message already fired or cancelled")

// Scheduler fires due schedules. Its run goroutine is the only one that
// fires; it sleeps until the soonest pending row is due (at most
// SchedulePoll, so rows other brokers wrote are seen), and Poke wakes it
// early when a schedule is created or cancelled.
type Scheduler struct {
	store  *store
	limits config.Toolbox
	log    *slog.Logger
	now    func() time.Time
	sender Sender
	audit  Auditor

	wake   chan struct{} // one slot: a poke while the owner is busy is kept, extra ones are dropped
	cancel context.CancelFunc
	done   chan struct{}
	once   sync.Once

	fired atomic.Int64           // fires committed by this process
	fires *prometheus.CounterVec // the same, by outcome and lateness
}

func newScheduler(st *store, limits config.Toolbox, log *slog.Logger, now func() time.Time, sender Sender, audit Auditor) *Scheduler {
	return &Scheduler{store: st, limits: limits, log: log, now: now, sender: sender, audit: audit, wake: make(chan struct{}, 1),
		fires: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshbroker_scheduled_fires_total",
			Help: "Scheduled messages fired, by outcome (queued: stored and routed; refused: the send path refused it) and whether the fire was late",
		}, []string{"outcome", "late"})}
}

func (s *Scheduler) start() {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.done = cancel, make(chan struct{})
	go s.run(ctx)
}

func (s *Scheduler) stop() {
	s.once.Do(func() {
		if s.cancel == nil {
			return
		}
		s.cancel()
		<-s.done
	})
}

// Poke makes the owner look at the schedules now.
func (s *Scheduler) Poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Fired counts the fires this process committed.
func (s *Scheduler) Fired() int64 { return s.fired.Load() }

func (s *Scheduler) run(ctx context.Context) {
	defer close(s.done)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-s.wake:
		}
		timer.Reset(s.round(ctx))
	}
}

// round fires every due row and returns how long to sleep.
func (s *Scheduler) round(ctx context.Context) time.Duration {
	failed := false
	for ctx.Err() == nil {
		rows, err := s.due(ctx)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Error("scheduler: read due rows", "err", err)
			}
			return retryAfter
		}
		var wg sync.WaitGroup
		var bad atomic.Bool
		slots := make(chan struct{}, fireWorkers)
		for _, r := range rows {
			slots <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-slots }()
				if err := s.fire(ctx, r); err != nil {
					bad.Store(true)
					if ctx.Err() == nil {
						s.log.Error("scheduler: fire", "scheduled_id", r.ID, "err", err)
					}
				}
			}()
		}
		wg.Wait()
		if bad.Load() {
			failed = true
			break
		}
		if len(rows) < s.limits.ScheduleFireBatch {
			break
		}
	}
	wait := s.limits.SchedulePoll
	var next []struct{ DeliverAt *time.Time }
	if err := s.store.raw(ctx, &next, `SELECT deliver_at FROM `+s.store.table("scheduled_message")+`
		WHERE cancelled = false AND (cron IS NOT NULL OR fired_at IS NULL) AND deliver_at IS NOT NULL
		ORDER BY deliver_at LIMIT 1`); err == nil && len(next) == 1 && next[0].DeliverAt != nil {
		wait = min(wait, max(next[0].DeliverAt.Sub(s.now()), 0))
	}
	if failed {
		wait = max(wait, retryAfter)
	}
	return wait
}

func (s *Scheduler) due(ctx context.Context) ([]scheduleRow, error) {
	var rows []scheduleRow
	err := s.store.raw(ctx, &rows, `SELECT `+scheduleColumns+` FROM `+s.store.table("scheduled_message")+`
		WHERE cancelled = false AND (cron IS NOT NULL OR fired_at IS NULL) AND deliver_at <= ?
		ORDER BY deliver_at, id LIMIT ?`, s.now().UTC(), s.limits.ScheduleFireBatch)
	return rows, err
}

// fire sends one due row through the send path. The row is claimed (its
// fired_count moved on, and for a cron row its deliver_at moved to the next
// fire) by a conditional UPDATE inside the transaction that stores the
// message, so the message is stored exactly when the claim commits: a
// crash before the commit leaves the row due and it fires after the
// restart, a crash after it leaves nothing to fire again. A fire whose
// message is refused (no recipient for a broadcast, grants) still counts,
// claimed on its own. A fire later than ScheduleLate is flagged late in
// the log and the audit entry; after downtime a cron row fires once, not
// once per missed tick.
func (s *Scheduler) fire(ctx context.Context, r scheduleRow) error {
	now := s.now()
	var nextAt *time.Time
	if r.Cron != nil {
		sched, _, err := parseCron(*r.Cron, now, s.limits.ScheduleMinPeriod)
		if err != nil {
			// Written by something other than this broker's schedule frame.
			s.log.Warn("scheduler: cancelling a schedule with an unusable cron expression", "scheduled_id", r.ID)
			_, cerr := s.store.exec(ctx, `UPDATE `+s.store.table("scheduled_message")+` SET cancelled = true WHERE id = ?`, r.ID)
			return cerr
		}
		n := sched.Next(now).UTC()
		nextAt = &n
	}
	claim := func(tx *gorm.DB) error {
		q := `UPDATE ` + s.store.table("scheduled_message") + ` SET fired_count = fired_count + 1, fired_at = ?`
		args := []any{now.UTC()}
		if nextAt != nil {
			q += `, deliver_at = ?`
			args = append(args, *nextAt)
		}
		q += ` WHERE id = ? AND cancelled = false AND fired_count = ?`
		args = append(args, r.ID, r.FiredCount)
		if nextAt == nil {
			q += ` AND fired_at IS NULL`
		}
		res := tx.Exec(q, args...)
		if res.Error != nil {
			return res.Error
		}
		if res.RowsAffected == 0 {
			return errClaimed
		}
		return nil
	}
	out, err := s.sender.SendScheduled(ctx, Dispatch{
		MeshID: r.MeshID, MemberID: r.MemberID, TargetSpec: r.To,
		Ciphertext: base64.StdEncoding.EncodeToString([]byte(r.Message)), Claim: claim,
	})
	if errors.Is(err, errClaimed) {
		return nil
	}
	if err != nil {
		return err
	}
	if !out.Queued {
		err := s.store.conn(ctx).Transaction(claim)
		if errors.Is(err, errClaimed) {
			return nil
		}
		if err != nil {
			return err
		}
		if out.SenderGone {
			if _, err := s.store.exec(ctx, `UPDATE `+s.store.table("scheduled_message")+` SET cancelled = true WHERE id = ?`, r.ID); err != nil {
				return err
			}
		}
	}
	s.fired.Add(1)
	var lateness time.Duration
	if r.DeliverAt != nil {
		lateness = now.Sub(*r.DeliverAt)
	}
	late := lateness > s.limits.ScheduleLate
	outcome := "queued"
	if !out.Queued {
		outcome = "refused"
	}
	s.fires.WithLabelValues(outcome, strconv.FormatBool(late)).Inc()
	payload := map[string]any{"scheduledId": r.ID, "to": r.To, "delivered": out.Queued, "firedCount": r.FiredCount + 1, "late": late}
	if late {
		payload["lateMs"] = lateness.Milliseconds()
	}
	s.audit.Record(r.MeshID, "schedule_fired", r.MemberID, "", payload)
	level := slog.LevelInfo
	if late || !out.Queued {
		level = slog.LevelWarn
	}
	// Never the body: ids, target and outcome only.
	s.log.Log(ctx, level, "scheduled message fired", "scheduled_id", r.ID, "mesh_id", r.MeshID, "delivered", out.Queued,
		"rejection", out.Rejection, "late", late, "late_ms", lateness.Milliseconds(), "cron", r.Cron != nil)
	return nil
}
