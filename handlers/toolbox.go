package handlers

import (
	"context"
	"errors"

	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
	"github.com/claudemesh/meshbroker/toolbox"
)

// The shared toolbox's frames (package toolbox): decode, call, encode.

// caller is the narrow view of this socket the toolbox gets.
func (w *wsConn) caller() toolbox.Caller {
	c := w.presence
	return toolbox.Caller{MeshID: c.MeshID, MemberID: c.MemberID, PresenceID: c.PresenceID, MemberPubkey: c.MemberPubkey,
		SessionPubkey: c.SessionPubkey, SessionHello: c.Role == services.RoleSession, DisplayName: w.srv.svc.Presence.DisplayName(c)}
}

// toolboxErr turns a toolbox refusal into the error frame replyError sends.
func toolboxErr(err error) error {
	var te *toolbox.Error
	if errors.As(err, &te) {
		return &services.Error{Code: te.Code, Msg: te.Msg}
	}
	return err
}

// toolboxFrame adapts a typed toolbox call to a frameHandler.
func toolboxFrame[T any](call func(ctx context.Context, w *wsConn, h protocol.Head, f *T) (any, error)) frameHandler {
	return func(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
		f, err := decodeInto[T](data)
		if err != nil {
			return nil, err
		}
		resp, err := call(ctx, w, h, f)
		if err != nil {
			return nil, toolboxErr(err)
		}
		return resp, nil
	}
}

func orEmpty(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

var handleRemember = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.Remember) (any, error) {
	id, err := w.srv.svc.Toolbox.Remember(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.MemoryStored{Type: "memory_stored", ID: id, MemoryID: id, ReqID: h.ReqID}, nil
})

// handleRecall answers in both shapes the CLI awaits: memory_results (its
// cold path, and the reference), then memory_recall_result (its daemon).
var handleRecall = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.Recall) (any, error) {
	mems, err := w.srv.svc.Toolbox.Recall(ctx, w.caller(), orEmpty(f.Query))
	if err != nil {
		return nil, err
	}
	w.reply(protocol.MemoryResults{Type: "memory_results", Memories: mems, ReqID: h.ReqID})
	return protocol.MemoryRecallResult{Type: "memory_recall_result", Matches: mems, ReqID: h.ReqID}, nil
})

var handleForget = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.Forget) (any, error) {
	id, err := w.srv.svc.Toolbox.Forget(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.ForgetAck{Type: "ack", ID: id, MessageID: id, Queued: false, ReqID: h.ReqID}, nil
})

var handleCreateTask = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.CreateTask) (any, error) {
	id, err := w.srv.svc.Toolbox.CreateTask(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.TaskCreated{Type: "task_created", ID: id, ReqID: h.ReqID}, nil
})

var handleClaimTask = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.TaskRef) (any, error) {
	tasks, err := w.srv.svc.Toolbox.ClaimTask(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.TaskList{Type: "task_list", Tasks: tasks, ReqID: h.ReqID}, nil
})

var handleCompleteTask = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.TaskRef) (any, error) {
	tasks, err := w.srv.svc.Toolbox.CompleteTask(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.TaskList{Type: "task_list", Tasks: tasks, ReqID: h.ReqID}, nil
})

var handleListTasks = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.ListTasks) (any, error) {
	tasks, err := w.srv.svc.Toolbox.ListTasks(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.TaskList{Type: "task_list", Tasks: tasks, ReqID: h.ReqID}, nil
})

var handleSchedule = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.Schedule) (any, error) {
	ack, err := w.srv.svc.Toolbox.Schedule(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	ack.ReqID = h.ReqID
	return ack, nil
})

var handleListScheduled = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, _ *struct{}) (any, error) {
	list, err := w.srv.svc.Toolbox.ListScheduled(ctx, w.caller())
	if err != nil {
		return nil, err
	}
	return protocol.ScheduledList{Type: "scheduled_list", Messages: list, ReqID: h.ReqID}, nil
})

var handleCancelScheduled = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.CancelScheduled) (any, error) {
	id, ok, err := w.srv.svc.Toolbox.CancelScheduled(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.CancelScheduledAck{Type: "cancel_scheduled_ack", ScheduledID: id, OK: ok, ReqID: h.ReqID}, nil
})

var handleShareContext = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.ShareContext) (any, error) {
	id, err := w.srv.svc.Toolbox.ShareContext(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.ContextShared{Type: "context_shared", ID: id, ReqID: h.ReqID}, nil
})

var handleGetContext = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.GetContext) (any, error) {
	list, err := w.srv.svc.Toolbox.GetContext(ctx, w.caller(), orEmpty(f.Query))
	if err != nil {
		return nil, err
	}
	return protocol.ContextResults{Type: "context_results", Contexts: list, ReqID: h.ReqID}, nil
})

var handleListContexts = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, _ *struct{}) (any, error) {
	list, err := w.srv.svc.Toolbox.ListContexts(ctx, w.caller())
	if err != nil {
		return nil, err
	}
	return protocol.ContextResults{Type: "context_list", Contexts: list, ReqID: h.ReqID}, nil
})

var handleShareSkill = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.ShareSkill) (any, error) {
	name, err := w.srv.svc.Toolbox.ShareSkill(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.SkillAck{Type: "skill_ack", Name: name, Action: "shared", ReqID: h.ReqID}, nil
})

var handleGetSkill = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.SkillRef) (any, error) {
	skill, err := w.srv.svc.Toolbox.GetSkill(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.SkillData{Type: "skill_data", Skill: skill, ReqID: h.ReqID}, nil
})

var handleListSkills = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.ListSkills) (any, error) {
	list, err := w.srv.svc.Toolbox.ListSkills(ctx, w.caller(), orEmpty(f.Query))
	if err != nil {
		return nil, err
	}
	return protocol.SkillList{Type: "skill_list", Skills: list, ReqID: h.ReqID}, nil
})

var handleRemoveSkill = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.SkillRef) (any, error) {
	removed, err := w.srv.svc.Toolbox.RemoveSkill(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	action := "not_found"
	if removed {
		action = "removed"
	}
	return protocol.SkillAck{Type: "skill_ack", Name: orEmpty(f.Name), Action: action, ReqID: h.ReqID}, nil
})

var handleVaultSet = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.VaultSet) (any, error) {
	key, err := w.srv.svc.Toolbox.VaultSet(ctx, w.caller(), f)
	if err != nil {
		return nil, err
	}
	return protocol.VaultAck{Type: "vault_ack", Key: key, Action: "stored", ReqID: h.ReqID}, nil
})

var handleVaultList = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, _ *struct{}) (any, error) {
	list, err := w.srv.svc.Toolbox.VaultList(ctx, w.caller())
	if err != nil {
		return nil, err
	}
	return protocol.VaultEntries{Type: "vault_list_result", Entries: list, ReqID: h.ReqID}, nil
})

var handleVaultGet = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.VaultGet) (any, error) {
	list, err := w.srv.svc.Toolbox.VaultGet(ctx, w.caller(), f.Keys)
	if err != nil {
		return nil, err
	}
	return protocol.VaultEntries{Type: "vault_get_result", Entries: list, ReqID: h.ReqID}, nil
})

var handleVaultDelete = toolboxFrame(func(ctx context.Context, w *wsConn, h protocol.Head, f *protocol.VaultKey) (any, error) {
	ok, err := w.srv.svc.Toolbox.VaultDelete(ctx, w.caller(), orEmpty(f.Key))
	if err != nil {
		return nil, err
	}
	action := "not_found"
	if ok {
		action = "deleted"
	}
	return protocol.VaultAck{Type: "vault_ack", Key: orEmpty(f.Key), Action: action, ReqID: h.ReqID}, nil
})
