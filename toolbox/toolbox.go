// Package toolbox is the shared toolbox the claudemesh CLI teaches every
// session: memory (remember, recall, forget), the task board, scheduled
// messages, shared contexts, skills and the per-member vault. Its frames
// are the reference broker's; its rows live in the reference's tables
// (mesh.memory, mesh.task, mesh.scheduled_message, mesh.context, mesh.skill,
// mesh.vault_entry) on Postgres and in the same tables on SQLite.
//
// It depends on the core only through Caller (who sends the frame), Sender
// (the normal send path, for due schedules), Notifier (a mesh-wide push)
// and Moderators (is a member an admin); main wires them.
//
// Concurrency. Everything but scheduling is request/response: a method runs
// on the caller's goroutine, holds no lock and shares nothing but the
// database, whose statements make each operation atomic (a task claim is
// one conditional UPDATE, so of two concurrent claims exactly one matches).
// Scheduling has one owner: the Scheduler's run goroutine owns its timer
// and is the only one that fires schedules. Frames that create or cancel a
// schedule write the row and poke the owner through a one-slot channel;
// the owner reads due rows from the database, so rows another broker
// created are fired too. A due row is claimed by a conditional UPDATE in
// the same transaction that inserts its queue row (see Scheduler.fire), so
// a crash never loses a fire and two brokers never both fire one.
package toolbox

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// Caller is the authenticated connection a frame came from.
type Caller struct {
	MeshID        string
	MemberID      string
	PresenceID    string
	MemberPubkey  string
	SessionPubkey string // the hello's session key or label; "" when none
	// SessionHello is true for a session_hello (a launched session's own
	// attested key), false for a member hello, whose sessionPubkey is only a
	// label (the CLI's short-lived connections make one up per command).
	SessionHello bool
	DisplayName  string
}

// Error is a refusal the edge turns into an error frame with Code.
type Error struct {
	Code protocol.Code
	Msg  string
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Msg }

func invalid(format string, a ...any) *Error {
	return &Error{Code: protocol.CodeInvalidArgument, Msg: fmt.Sprintf(format, a...)}
}

func notFound(what string) *Error {
	return &Error{Code: protocol.CodeNotFound, Msg: what + " not found in this mesh"}
}

func limit(format string, a ...any) *Error {
	return &Error{Code: protocol.CodeLimitExceeded, Msg: fmt.Sprintf(format, a...)}
}

// Auditor records metadata-only audit entries (never content, queries or
// vault values).
type Auditor interface {
	Record(meshID, eventType, actorMemberID, actorName string, payload map[string]any)
}

// Notifier pushes a frame to every online peer of a mesh but one presence.
type Notifier interface {
	NotifyMesh(meshID, exceptPresenceID string, frame any)
}

// Moderators answers whether a member may moderate its mesh (admin or owner).
type Moderators interface {
	IsModerator(ctx context.Context, meshID, memberID string) (bool, error)
}

// Toolbox answers the toolbox frames.
type Toolbox struct {
	store  *store
	limits config.Toolbox
	log    *slog.Logger
	now    func() time.Time
	audit  Auditor
	notify Notifier
	mods   Moderators
	sched  *Scheduler

	maxSendBytes int // the send path's payload cap (MAX_MESSAGE_BYTES)
}

// Deps are the Toolbox's collaborators.
type Deps struct {
	DB         *models.DB
	Limits     config.Toolbox
	Log        *slog.Logger
	Now        func() time.Time
	Audit      Auditor
	Notify     Notifier
	Moderators Moderators
	Sender     Sender
	// Registry receives the toolbox's metrics (nil: none registered).
	Registry prometheus.Registerer
	// MaxSendBytes is the send path's cap on a payload (MAX_MESSAGE_BYTES):
	// a scheduled body that would exceed it once base64-encoded is refused
	// when scheduled rather than when it falls due.
	MaxSendBytes int
}

// New makes the toolbox and its scheduler; Start runs the scheduler.
func New(d Deps) *Toolbox {
	st := &store{db: d.DB}
	t := &Toolbox{store: st, limits: d.Limits, log: d.Log.With("svc", "toolbox"), now: d.Now, audit: d.Audit, notify: d.Notify, mods: d.Moderators, maxSendBytes: d.MaxSendBytes}
	t.sched = newScheduler(st, d.Limits, t.log, d.Now, d.Sender, d.Audit)
	if d.Registry != nil {
		d.Registry.MustRegister(t.sched.fires)
	}
	return t
}

// Start runs the scheduler until Stop.
func (t *Toolbox) Start() { t.sched.start() }

// Stop stops the scheduler and waits for a fire in progress.
func (t *Toolbox) Stop() { t.sched.stop() }

// Scheduler is the toolbox's timer owner (tests poke it).
func (t *Toolbox) Scheduler() *Scheduler { return t.sched }

// TaskCounts are a mesh's tasks by status.
type TaskCounts struct {
	Open    int64 `json:"open"`
	Claimed int64 `json:"claimed"`
	Done    int64 `json:"done"`
}

// Counts returns the mesh's live memories and its tasks by status, for
// mesh_info's memoryCount and tasks.
func (t *Toolbox) Counts(ctx context.Context, meshID string) (memories int64, tasks TaskCounts, err error) {
	if memories, err = t.MemoryCount(ctx, meshID); err != nil {
		return 0, tasks, err
	}
	tasks, err = t.TaskCounts(ctx, meshID)
	return memories, tasks, err
}

// MemoryCount is the number of the mesh's memories not forgotten.
func (t *Toolbox) MemoryCount(ctx context.Context, meshID string) (int64, error) {
	return t.store.count(ctx, "memory", "mesh_id = ? AND forgotten_at IS NULL", meshID)
}

// TaskCounts counts the mesh's tasks by status.
func (t *Toolbox) TaskCounts(ctx context.Context, meshID string) (TaskCounts, error) {
	var tasks TaskCounts
	var rows []struct {
		Status string
		N      int64
	}
	if err := t.store.raw(ctx, &rows, `SELECT status, count(*) AS n FROM `+t.store.table("task")+` WHERE mesh_id = ? GROUP BY status`, meshID); err != nil {
		return tasks, err
	}
	for _, r := range rows {
		switch r.Status {
		case "open":
			tasks.Open = r.N
		case "claimed":
			tasks.Claimed = r.N
		case "done":
			tasks.Done = r.N
		}
	}
	return tasks, nil
}

// Purge deletes memories forgotten and one-shot schedules fired more than
// PurgeAfter ago, and cancelled schedules created that long ago (on SQLite with their recall index rows).
func (t *Toolbox) Purge(ctx context.Context) error {
	s := t.store
	cutoff := t.now().Add(-t.limits.PurgeAfter).UTC()
	if !s.pg() {
		if _, err := s.exec(ctx, `DELETE FROM memory_fts WHERE memory_id IN (SELECT id FROM memory WHERE forgotten_at < ?)`, cutoff); err != nil {
			return err
		}
	}
	memories, err := s.exec(ctx, `DELETE FROM `+s.table("memory")+` WHERE forgotten_at < ?`, cutoff)
	if err != nil {
		return err
	}
	schedules, err := s.exec(ctx, `DELETE FROM `+s.table("scheduled_message")+` WHERE (cron IS NULL AND fired_at < ?) OR (cancelled = true AND created_at < ?)`, cutoff, cutoff)
	if err != nil {
		return err
	}
	if memories+schedules > 0 {
		t.log.Info("purged old toolbox rows", "forgotten_memories", memories, "finished_schedules", schedules)
	}
	return nil
}

// iso renders a stored time as the reference's toISOString.
func iso(t time.Time) string { return protocol.ISO(t) }

// nameOr is the reference's `?? "unknown"` for a nullable name.
func nameOr(s *string) string {
	if s == nil || *s == "" {
		return "unknown"
	}
	return *s
}

func strPtr(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}
