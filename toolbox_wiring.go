package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
	"github.com/claudemesh/meshbroker/toolbox"
)

// Wiring of package toolbox to the core: the adapters below are its only
// view of presence and messaging.

func newToolbox(cfg config.Config, logger *slog.Logger, db *models.DB, now func() time.Time, b *broker, members *services.MemberDirectory) *toolbox.Toolbox {
	return toolbox.New(toolbox.Deps{
		DB: db, Limits: cfg.Toolbox, Log: logger, Now: now, Audit: b.audit,
		Notify:       meshNotifier{b.presence},
		Moderators:   members,
		Sender:       scheduledSender{b.messaging},
		MaxSendBytes: cfg.MaxMessageBytes,
		Registry:     b.metrics.Registry,
	})
}

// scheduledSender sends due schedules through messaging as their creator,
// priority now, body base64 with an empty nonce (the reference's shape).
type scheduledSender struct{ m *services.MessagingService }

func (s scheduledSender) SendScheduled(ctx context.Context, d toolbox.Dispatch) (toolbox.Outcome, error) {
	out, err := s.m.SendScheduled(ctx, services.ScheduledSend{
		MeshID: d.MeshID, MemberID: d.MemberID, TargetSpec: d.TargetSpec, Priority: "now", Nonce: "", Ciphertext: d.Ciphertext, Claim: d.Claim,
	})
	return toolbox.Outcome{Queued: out.Queued, Rejection: out.Rejection, SenderGone: out.SenderGone}, err
}

// meshNotifier pushes to every online peer of a mesh but one presence.
type meshNotifier struct{ p *services.PresenceService }

func (n meshNotifier) NotifyMesh(meshID, exceptPresenceID string, frame any) {
	f, err := protocol.Encode(frame)
	if err != nil {
		return
	}
	n.p.Broadcast(meshID, f, func(v services.PeerView) bool { return v.Conn.PresenceID != exceptPresenceID })
}

// toolboxCounters lets mesh_info count the toolbox's memories and tasks.
func toolboxCounters(t *toolbox.Toolbox) services.MeshInfoCounters {
	c := meshInfoCounts{t}
	return services.MeshInfoCounters{Memories: c, Tasks: c}
}

type meshInfoCounts struct{ t *toolbox.Toolbox }

func (c meshInfoCounts) CountMemories(ctx context.Context, meshID string) (int, error) {
	memories, err := c.t.MemoryCount(ctx, meshID)
	return int(memories), err
}

func (c meshInfoCounts) CountTasks(ctx context.Context, meshID string) (protocol.TaskCounts, error) {
	tasks, err := c.t.TaskCounts(ctx, meshID)
	return protocol.TaskCounts{Open: int(tasks.Open), Claimed: int(tasks.Claimed), Done: int(tasks.Done)}, err
}
