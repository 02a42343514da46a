package toolbox

import (
	"context"
	"encoding/base64"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/robfig/cron/v3"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// pastTolerance is how far in the past a deliverAt may be (clock skew
// between the CLI's machine and the broker); such a schedule fires at once.
const pastTolerance = 5 * time.Second

// cronParser reads the reference's 5-field expressions (minute hour dom
// month dow) and the @hourly-style descriptors.
var cronParser = cron.NewParser(cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

// parseCron parses expr and checks it fires, and not more often than
// minPeriod. Times are in the broker's local zone, as in the reference.
func parseCron(expr string, now time.Time, minPeriod time.Duration) (cron.Schedule, time.Time, error) {
	bad := func(why string) error {
		return &Error{Code: protocol.CodeInvalidCron, Msg: fmt.Sprintf("Invalid cron expression: %s (%s)", expr, why)}
	}
	sched, err := cronParser.Parse(strings.TrimSpace(expr))
	if err != nil {
		return nil, time.Time{}, bad(err.Error())
	}
	first := sched.Next(now)
	if first.IsZero() {
		return nil, time.Time{}, bad("it never fires")
	}
	// Five consecutive gaps: enough to catch any sub-minute step, which
	// would show in the first gap; @every is refused by the parser options.
	prev := first
	for range 5 {
		next := sched.Next(prev)
		if next.IsZero() {
			break
		}
		if next.Sub(prev) < minPeriod {
			return nil, time.Time{}, bad("it fires more often than once a minute")
		}
		prev = next
	}
	return sched, first, nil
}

// Schedule stores a scheduled message and returns its id, first fire time
// and cron expression. The body is kept in plaintext, as in the reference,
// and delivered base64-encoded with an empty nonce: the broker cannot seal
// it to the recipient. It is never logged or audited.
func (t *Toolbox) Schedule(ctx context.Context, c Caller, f *protocol.Schedule) (protocol.ScheduledAck, error) {
	var ack protocol.ScheduledAck
	to, err := required("to", f.To, maxNameBytes)
	if err != nil {
		return ack, err
	}
	if strings.HasPrefix(to, "#") {
		return ack, invalid("scheduled messages go to a peer, a @group, * or yourself, not to a topic")
	}
	// "Self" from a CLI command is the label of its own connection, which
	// is gone once the command exits; the member key reaches the member's
	// daemon and sessions. A launched session's own key is kept: it means
	// that session.
	if !c.SessionHello && c.SessionPubkey != "" && to == c.SessionPubkey {
		to = c.MemberPubkey
	}
	message, err := required("message", f.Message, t.limits.MaxItemBytes)
	if err != nil {
		return ack, err
	}
	if t.maxSendBytes > 0 && base64.StdEncoding.EncodedLen(len(message))+len(to) > t.maxSendBytes {
		return ack, limit("message is too large to send: %d bytes encoded, more than MAX_MESSAGE_BYTES=%d", base64.StdEncoding.EncodedLen(len(message))+len(to), t.maxSendBytes)
	}
	subtype, err := optional("subtype", f.Subtype, 32)
	if err != nil {
		return ack, err
	}
	now := t.now()
	var cronExpr *string
	var deliverAt time.Time
	if f.Cron != nil && strings.TrimSpace(*f.Cron) != "" {
		expr := strings.TrimSpace(*f.Cron)
		if len(expr) > maxNameBytes {
			return ack, &Error{Code: protocol.CodeInvalidCron, Msg: "Invalid cron expression: too long"}
		}
		_, first, err := parseCron(expr, now, t.limits.ScheduleMinPeriod)
		if err != nil {
			return ack, err
		}
		if first.Sub(now) > t.limits.ScheduleHorizon {
			return ack, &Error{Code: protocol.CodeInvalidCron, Msg: "Invalid cron expression: " + expr + " (first fire more than a year ahead)"}
		}
		cronExpr, deliverAt = &expr, first
	} else {
		if f.DeliverAt == nil || math.IsNaN(*f.DeliverAt) || math.IsInf(*f.DeliverAt, 0) {
			return ack, invalid("deliverAt (Unix milliseconds) or cron is required")
		}
		ms := *f.DeliverAt
		if ms < float64(now.Add(-pastTolerance).UnixMilli()) {
			return ack, invalid("deliverAt is in the past")
		}
		if ms > float64(now.Add(t.limits.ScheduleHorizon).UnixMilli()) {
			return ack, invalid("deliverAt is more than a year ahead")
		}
		deliverAt = time.UnixMilli(int64(ms))
	}
	s := t.store
	pending := `mesh_id = ? AND cancelled = false AND (cron IS NOT NULL OR fired_at IS NULL)`
	n, err := s.count(ctx, "scheduled_message", pending, c.MeshID)
	if err != nil {
		return ack, err
	}
	if n >= int64(t.limits.MaxSchedules) {
		return ack, limit("this mesh has %d pending scheduled messages, the most allowed", t.limits.MaxSchedules)
	}
	n, err = s.count(ctx, "scheduled_message", pending+` AND member_id = ?`, c.MeshID, c.MemberID)
	if err != nil {
		return ack, err
	}
	if n >= int64(t.limits.MaxSchedulesPerMember) {
		return ack, limit("you have %d pending scheduled messages, the most allowed; cancel some first", t.limits.MaxSchedulesPerMember)
	}
	id := models.NewID()
	if _, err := s.exec(ctx, `INSERT INTO `+s.table("scheduled_message")+` (id, mesh_id, presence_id, member_id, "to", message, deliver_at, cron, subtype, fired_count, cancelled, created_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, false, ?)`,
		id, c.MeshID, strPtr(c.PresenceID), c.MemberID, to, message, deliverAt.UTC(), cronExpr, strPtr(subtype), now.UTC()); err != nil {
		return ack, err
	}
	t.audit.Record(c.MeshID, "schedule_created", c.MemberID, c.DisplayName, map[string]any{"scheduledId": id, "to": to, "cron": cronExpr != nil, "bytes": len(message)})
	t.sched.Poke()
	ack = protocol.ScheduledAck{Type: "scheduled_ack", ScheduledID: id, DeliverAt: deliverAt.UnixMilli()}
	if cronExpr != nil {
		ack.Cron = *cronExpr
	}
	return ack, nil
}

type scheduleRow struct {
	ID         string
	MeshID     string
	MemberID   string
	To         string
	Message    string
	DeliverAt  *time.Time
	Cron       *string
	Subtype    *string
	FiredCount int
	CreatedAt  time.Time
}

const scheduleColumns = `id, mesh_id, member_id, "to", message, deliver_at, cron, subtype, fired_count, created_at`

// ListScheduled lists the caller's member's pending schedules, soonest first.
func (t *Toolbox) ListScheduled(ctx context.Context, c Caller) ([]protocol.ScheduledView, error) {
	var rows []scheduleRow
	if err := t.store.raw(ctx, &rows, `SELECT `+scheduleColumns+` FROM `+t.store.table("scheduled_message")+`
		WHERE mesh_id = ? AND member_id = ? AND cancelled = false AND (cron IS NOT NULL OR fired_at IS NULL)
		ORDER BY deliver_at, id`, c.MeshID, c.MemberID); err != nil {
		return nil, err
	}
	out := make([]protocol.ScheduledView, 0, len(rows))
	for _, r := range rows {
		v := protocol.ScheduledView{ID: r.ID, To: r.To, Message: r.Message, CreatedAt: r.CreatedAt.UnixMilli()}
		if r.DeliverAt != nil {
			v.DeliverAt = r.DeliverAt.UnixMilli()
		}
		if r.Cron != nil {
			v.Cron = *r.Cron
			fired := r.FiredCount
			v.FiredCount = &fired
		}
		out = append(out, v)
	}
	return out, nil
}

// CancelScheduled cancels one of the caller's member's pending schedules;
// false for an id that is not one (unknown, fired, cancelled, another's).
func (t *Toolbox) CancelScheduled(ctx context.Context, c Caller, f *protocol.CancelScheduled) (string, bool, error) {
	id, err := required("scheduledId", f.ScheduledID, maxNameBytes)
	if err != nil {
		return "", false, err
	}
	n, err := t.store.exec(ctx, `UPDATE `+t.store.table("scheduled_message")+` SET cancelled = true
		WHERE id = ? AND mesh_id = ? AND member_id = ? AND cancelled = false AND (cron IS NOT NULL OR fired_at IS NULL)`, id, c.MeshID, c.MemberID)
	if err != nil {
		return id, false, err
	}
	if n > 0 {
		t.audit.Record(c.MeshID, "schedule_cancelled", c.MemberID, c.DisplayName, map[string]any{"scheduledId": id})
		t.sched.Poke()
	}
	return id, n > 0, nil
}
