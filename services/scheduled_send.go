package services

import (
	"context"
	"fmt"
	"strings"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/protocol"
)

// ScheduledSend is a due scheduled message going out through the normal
// send path as its creator: same routing, grants, queueing, pushes and
// message_sent audit as a live send, with three differences. The sender
// need not be online (it sends as its member key, from no connection);
// the send rate limit does not apply (schedules are capped when created);
// and a DM to a member or session key nobody holds right now is queued for
// that key's next drain instead of refused, so a reminder fired while its
// recipient is away arrives when it comes back.
type ScheduledSend struct {
	MeshID     string
	MemberID   string
	TargetSpec string
	Priority   string
	Nonce      string
	Ciphertext string
	// Claim runs in the transaction that inserts the queue row; an error
	// from it rolls the insert back and is returned unchanged.
	Claim func(tx *gorm.DB) error
}

// ScheduledOutcome is what became of a ScheduledSend. When Queued is false
// nothing was stored and Claim did not run.
type ScheduledOutcome struct {
	Queued     bool
	MessageID  string
	Rejection  string // the rejection ack's text when not queued
	SenderGone bool   // the creator is no longer an active member
}

// SendScheduled sends s as its creator.
func (m *MessagingService) SendScheduled(ctx context.Context, s ScheduledSend) (ScheduledOutcome, error) {
	member, err := m.schedSenders.load(ctx, s.MemberID, m.now(), func(ctx context.Context) (*MemberRow, error) {
		return m.members.ByID(ctx, s.MemberID)
	})
	if err != nil {
		return ScheduledOutcome{}, err
	}
	if member == nil || member.RevokedAt != nil || member.MeshID != s.MeshID {
		return ScheduledOutcome{SenderGone: true, Rejection: "sender is no longer a member"}, nil
	}
	if strings.HasPrefix(s.TargetSpec, "#") {
		return ScheduledOutcome{Rejection: "topics take no scheduled messages"}, nil
	}
	sender := &Conn{MeshID: s.MeshID, MemberID: member.ID, MemberPubkey: member.PeerPubkey, displayName: member.DisplayName}
	req := SendRequest{ID: "sched-" + s.MemberID, TargetSpec: s.TargetSpec, Priority: s.Priority, Nonce: s.Nonce, Ciphertext: s.Ciphertext, BodyVersion: 1}
	var ack protocol.Ack
	st := &sendState{claim: s.Claim, scheduled: true}
	if err := m.send(ctx, st, sender, req, func(a protocol.Ack) { ack = a }); err != nil {
		return ScheduledOutcome{}, err
	}
	if ack.Type == "" {
		return ScheduledOutcome{}, fmt.Errorf("scheduled send to %s: no outcome", protocol.Short(s.TargetSpec))
	}
	return ScheduledOutcome{Queued: ack.Queued, MessageID: ack.MessageID, Rejection: ack.Error}, nil
}

// queueForLater stores a scheduled DM for a key that no connection holds
// now; the key's next drain delivers it. The recipient's grants apply as
// to a live DM when the key is a member's.
func (m *MessagingService) queueForLater(ctx context.Context, st *sendState, sender *Conn, req SendRequest, row *QueueRow, reply func(protocol.Ack)) error {
	grants, err := m.members.Grants(ctx, sender.MeshID)
	if err != nil {
		return err
	}
	if g, ok := grants[row.TargetSpec]; ok && !Allows(g, sender.MemberPubkey, sender.SessionPubkey, "dm") {
		m.metrics.MessagesDroppedGrant.WithLabelValues("dm").Inc()
		reply(rejectAck(req.ID, errGrants))
		return nil
	}
	return m.store(ctx, st, sender, req, row, reply, func() {})
}
