package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"time"

	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// frameHandler handles one authenticated frame. It returns the reply (nil
// for none) or an error; a *services.Error becomes an error frame with its
// code, anything else an `internal` error frame and a log line.
type frameHandler func(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error)

// frameTimeout bounds one frame's work.
const frameTimeout = 30 * time.Second

// handlers maps frame types to their handler. Out-of-scope types of the
// reference answer `unsupported` (H8), like unknown ones.
var handlers = map[string]frameHandler{
	"send":           nil, // pipelined: see dispatchSend
	"client_ack":     handleClientAck,
	"message_status": handleMessageStatus,
	"list_peers":     handleListPeers,
	"set_status":     handleSetStatus,
	"set_summary":    handleSetSummary,
	"set_visible":    handleSetVisible,
	"set_profile":    handleSetProfile,
	"set_stats":      handleSetStats,
	"join_group":     handleJoinGroup,
	"leave_group":    handleLeaveGroup,
	"topic_create":   handleTopicCreate,
	"topic_list":     handleTopicList,
	"topic_join":     handleTopicJoin,
	"topic_leave":    handleTopicLeave,
	"disconnect":     handleModeration(false),
	"kick":           handleModeration(true),
	"ban":            handleBan,
	"unban":          handleUnban,
	"audit_query":    handleAuditQuery,
	"audit_verify":   handleAuditVerify,
	"hello":          nil, // handled before dispatch
	"session_hello":  nil,

	// Mesh verbs (handlers/meshverbs.go).
	"mesh_info":       handleMeshInfo,
	"list_bans":       handleListBans,
	"topic_members":   handleTopicMembers,
	"topic_history":   handleTopicHistory,
	"topic_mark_read": handleTopicMarkRead,

	// The shared toolbox (handlers/toolbox.go).
	"remember":         handleRemember,
	"recall":           handleRecall,
	"forget":           handleForget,
	"create_task":      handleCreateTask,
	"claim_task":       handleClaimTask,
	"complete_task":    handleCompleteTask,
	"list_tasks":       handleListTasks,
	"schedule":         handleSchedule,
	"list_scheduled":   handleListScheduled,
	"cancel_scheduled": handleCancelScheduled,
	"share_context":    handleShareContext,
	"get_context":      handleGetContext,
	"list_contexts":    handleListContexts,
	"share_skill":      handleShareSkill,
	"get_skill":        handleGetSkill,
	"list_skills":      handleListSkills,
	"remove_skill":     handleRemoveSkill,
	"vault_set":        handleVaultSet,
	"vault_get":        handleVaultGet,
	"vault_list":       handleVaultList,
	"vault_delete":     handleVaultDelete,
}

// dispatch decodes one inbound frame and answers it. It never panics on a
// frame: a panic in a handler is recovered, logged and answered `internal`.
func (w *wsConn) dispatch(data []byte) {
	h, send, err := protocol.DecodeHeadSend(data) // one pass for the hot path; send is unused for other types
	if errors.Is(err, protocol.ErrUnstorableText) {
		w.srv.svc.Metrics.MessagesRejected.WithLabelValues("parse_or_handler").Inc()
		w.rejectUnstorable(h, err)
		return
	}
	if err != nil {
		w.srv.svc.Metrics.MessagesRejected.WithLabelValues("parse_or_handler").Inc()
		w.reply(protocol.NewError(protocol.CodeMalformed, err.Error(), h))
		return
	}
	defer func() {
		if r := recover(); r != nil {
			w.logAt(slog.LevelError, "frame handler panic", "type", h.Type, "panic", r)
			w.reply(protocol.NewError(protocol.CodeInternal, "internal error", h))
		}
	}()
	if h.Type == "hello" || h.Type == "session_hello" {
		w.handleHello(h, data)
		return
	}
	if w.presence == nil {
		w.reply(protocol.ErrorFrame{Type: "error", Code: protocol.CodeNoHello, Message: "must send hello first"})
		return
	}
	if h.Type == "send" {
		w.dispatchSend(h, send)
		return
	}
	// Any other frame waits for this socket's pipelined sends, so replies
	// keep the order of the frames that caused them (D8).
	w.sendsPending.Wait()
	handler := handlers[h.Type]
	if handler == nil {
		handler = extraHandlers[h.Type]
	}
	if handler == nil {
		w.reply(protocol.NewError(protocol.CodeUnsupported, "unsupported message type "+quoteType(h.Type), h))
		return
	}
	ctx, cancel := context.WithTimeout(w.srv.baseCtx, frameTimeout)
	defer cancel()
	resp, err := handler(ctx, w, h, data)
	if err != nil {
		w.replyError(h, err)
		return
	}
	if resp != nil {
		w.reply(resp)
	}
}

// rejectUnstorable answers a well-formed frame carrying text no database
// can hold (H11) the way that frame type answers any invalid argument: a
// hello is rejected and closed, a send gets its rejection ack (never the
// retryable "not stored"), anything else an error frame.
func (w *wsConn) rejectUnstorable(h protocol.Head, err error) {
	switch {
	case (h.Type == "hello" || h.Type == "session_hello") && w.presence == nil:
		w.logAt(slog.LevelInfo, "hello rejected", "code", protocol.CodeInvalidArgument)
		w.reply(protocol.ErrorFrame{Type: "error", Code: protocol.CodeInvalidArgument, Message: h.Type + " rejected: " + err.Error()})
		w.Close(protocol.HandshakeClose(protocol.CodeInvalidArgument))
	case h.Type == "send" && w.presence != nil:
		w.sendsPending.Wait() // the rejection keeps its place among the acks (D8)
		w.reply(protocol.Ack{Type: "ack", ID: h.ID, Error: "invalid_argument: " + err.Error()})
	default:
		w.reply(protocol.NewError(protocol.CodeInvalidArgument, err.Error(), h))
	}
}

func quoteType(t string) string {
	if len(t) > 64 {
		t = t[:64]
	}
	b, _ := json.Marshal(t)
	return string(b)
}

func (w *wsConn) reply(v any) {
	f, err := protocol.Encode(v)
	if err != nil {
		w.logAt(slog.LevelError, "encode reply", "err", err)
		return
	}
	w.Offer(f)
}

func (w *wsConn) replyError(h protocol.Head, err error) {
	if se, ok := services.AsError(err); ok {
		w.reply(protocol.NewError(se.Code, se.Msg, h))
		return
	}
	w.logAt(slog.LevelError, "frame handler", "type", h.Type, "err", err)
	w.reply(protocol.NewError(protocol.CodeInternal, "internal error", h))
}

// handleHello runs either hello. A rejection is an error frame followed by
// the handshake close; a second hello on an authenticated socket is an
// error and changes nothing (H4).
func (w *wsConn) handleHello(h protocol.Head, data []byte) {
	if w.presence != nil {
		w.reply(protocol.NewError(protocol.CodeAlreadyAuthenticated, "this socket already completed a hello", h))
		return
	}
	ctx, cancel := context.WithTimeout(w.srv.baseCtx, frameTimeout)
	defer cancel()
	started := time.Now()
	var c *services.Conn
	var err error
	result := "ok"
	defer func() {
		w.srv.svc.Metrics.HelloLatency.WithLabelValues(h.Type, result).Observe(time.Since(started).Seconds())
	}()
	if h.Type == "hello" {
		var f protocol.Hello
		if err = protocol.Decode(data, &f); err != nil {
			err = &services.HandshakeError{Code: protocol.CodeMalformed, Message: "hello rejected: malformed"}
		} else {
			c, err = w.srv.svc.Presence.Hello(ctx, w, &f)
		}
	} else {
		var f protocol.SessionHello
		if err = protocol.Decode(data, &f); err != nil {
			err = &services.HandshakeError{Code: protocol.CodeMalformed, Message: "session_hello rejected: malformed"}
		} else {
			c, err = w.srv.svc.Presence.SessionHello(ctx, w, &f)
		}
	}
	if err != nil {
		var he *services.HandshakeError
		if errors.As(err, &he) {
			result = "rejected"
			w.logAt(slog.LevelInfo, "hello rejected", "code", he.Code)
			w.reply(protocol.ErrorFrame{Type: "error", Code: he.Code, Message: he.Message})
			w.Close(protocol.HandshakeClose(he.Code))
			return
		}
		result = "error"
		w.logAt(slog.LevelError, "hello", "err", err)
		w.reply(protocol.ErrorFrame{Type: "error", Code: protocol.CodeInternal, Message: "internal error"})
		w.Close(protocol.Close{Code: 1011, Reason: "internal error", Retry: true})
		return
	}
	w.presence = c
	w.authed.Store(true)
	w.ident.Store(c)
}

// onFreshStack runs fn on a short-lived goroutine and waits for it. The
// reader's goroutine lives as long as its socket and mostly sits in a read;
// handling a frame (JSON decoding, database calls) needs a deeper stack,
// and a stack grown for it keeps its size while the socket idles: GC only
// halves a stack that is less than a quarter used. A panic in fn resurfaces
// in the caller.
func onFreshStack(fn func()) {
	var panicked any
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer func() { panicked = recover() }()
		fn()
	}()
	<-done
	if panicked != nil {
		panic(panicked)
	}
}

func decodeInto[T any](data []byte) (*T, error) {
	var v T
	if err := protocol.Decode(data, &v); err != nil {
		return nil, &services.Error{Code: protocol.CodeInvalidArgument, Msg: err.Error()}
	}
	return &v, nil
}

// dispatchSend accepts a send without waiting for its commit: the row is
// handed to the queue's writer now, in frame order, and the socket's
// completer acks and delivers it once committed, in the same order. A
// burst of sends on one socket thus shares group commits.
func (w *wsConn) dispatchSend(h protocol.Head, f *protocol.Send) {
	req, err := services.ParseSend(h, f)
	if err != nil {
		w.reply(protocol.Ack{Type: "ack", ID: h.ID, Error: "invalid_argument: " + err.Error()})
		return
	}
	ctx, cancel := context.WithTimeout(w.srv.baseCtx, frameTimeout)
	defer cancel()
	reply := func(a protocol.Ack) { w.reply(a) }
	if !req.Pipelinable() {
		w.sendsPending.Wait() // it completes now: after the sends before it
	}
	pending, err := w.srv.svc.Messaging.SendAsync(ctx, w.presence, req, reply)
	if err != nil {
		// Not stored, or not known to be: never ack it (M2). The client retries.
		w.logAt(slog.LevelError, "send", "err", err)
		w.reply(protocol.NewError(protocol.CodeInternal, "message not stored, retry", h))
		return
	}
	if pending == nil {
		return
	}
	if w.completions == nil { // an idle socket never pays for the completer
		w.completions, w.completerDone = make(chan completion, 64), make(chan struct{})
		go w.completeSends(w.completerDone)
	}
	w.sendsPending.Add(1)
	w.completions <- completion{pending: pending, head: h}
}

// completion is a pipelined send waiting for its commit.
type completion struct {
	pending *services.PendingSend
	head    protocol.Head
}

// completeSends finishes pipelined sends in the order they were accepted.
func (w *wsConn) completeSends(done chan<- struct{}) {
	defer close(done)
	for c := range w.completions {
		w.completeSend(c)
	}
}

// completeSend waits for one send's commit, then acks and delivers it. A
// panic there is logged and costs that send its ack (the client retries,
// and a stored row is deduplicated by its client id), never the broker or
// the sends after it.
func (w *wsConn) completeSend(c completion) {
	defer w.sendsPending.Done()
	defer func() {
		if r := recover(); r != nil {
			w.logAt(slog.LevelError, "send completion panic", "type", c.head.Type, "panic", r)
		}
	}()
	if err := c.pending.Wait(); err != nil {
		w.logAt(slog.LevelError, "send", "err", err)
		w.reply(protocol.NewError(protocol.CodeInternal, "message not stored, retry", c.head))
	}
}

func handleClientAck(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.ClientAck](data)
	if err != nil {
		return nil, err
	}
	broker, _ := protocol.RawString(f.BrokerMessageID)
	client, _ := protocol.RawString(f.ClientMessageID)
	return nil, w.srv.svc.Messaging.ClientAck(ctx, w.presence, broker, client)
}

func handleMessageStatus(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.MessageStatus](data)
	if err != nil {
		return nil, err
	}
	id, ok := protocol.RawString(f.MessageID)
	if !ok {
		id = string(f.MessageID)
	}
	res, err := w.srv.svc.Messaging.MessageStatus(ctx, w.presence, id)
	if err != nil {
		return nil, err
	}
	res.ReqID = h.ReqID
	return res, nil
}

func handleListPeers(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	peers, err := w.srv.svc.Presence.ListPeers(ctx, w.presence)
	if err != nil {
		return nil, err
	}
	w.logAt(slog.LevelDebug, "ws list_peers", "count", len(peers))
	return protocol.PeersList{Type: "peers_list", Peers: peers, ReqID: h.ReqID}, nil
}

func handleSetStatus(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.SetStatus](data)
	if err != nil {
		return nil, err
	}
	status, _ := protocol.RawString(f.Status)
	if !services.ValidStatus(status) {
		return nil, &services.Error{Code: protocol.CodeInvalidArgument, Msg: "status must be idle, working or dnd"}
	}
	w.logAt(slog.LevelInfo, "ws set_status", "status", status)
	return nil, w.srv.svc.Status.SetManual(ctx, w.presence.PresenceID, status)
}

func handleSetSummary(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.SetSummary](data)
	if err != nil {
		return nil, err
	}
	summary, _ := protocol.RawString(f.Summary)
	return nil, w.srv.svc.Presence.SetSummary(ctx, w.presence, summary)
}

func handleSetVisible(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.SetVisible](data)
	if err != nil {
		return nil, err
	}
	w.srv.svc.Presence.SetVisible(w.presence, protocol.RawIsTrue(f.Visible))
	return protocol.Ack{Type: "ack", ID: h.ReqID, ReqID: h.ReqID}, nil
}

func handleSetProfile(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[map[string]json.RawMessage](data)
	if err != nil {
		return nil, err
	}
	w.srv.svc.Presence.SetProfile(w.presence, *f)
	return protocol.Ack{Type: "ack", ID: h.ReqID, ReqID: h.ReqID}, nil
}

func handleSetStats(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.SetStats](data)
	if err != nil {
		return nil, err
	}
	w.srv.svc.Presence.SetStats(w.presence, f.Stats)
	return nil, nil
}

func groupArg(data []byte) (protocol.Group, error) {
	f, err := decodeInto[protocol.GroupChange](data)
	if err != nil {
		return protocol.Group{}, err
	}
	name, _ := protocol.RawString(f.Name)
	if name == "" {
		return protocol.Group{}, &services.Error{Code: protocol.CodeInvalidArgument, Msg: "name must be a non-empty string"}
	}
	role, _ := protocol.RawString(f.Role)
	return protocol.Group{Name: name, Role: role}, nil
}

func handleJoinGroup(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	g, err := groupArg(data)
	if err != nil {
		return nil, err
	}
	return nil, w.srv.svc.Presence.JoinGroup(ctx, w.presence, g)
}

func handleLeaveGroup(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	g, err := groupArg(data)
	if err != nil {
		return nil, err
	}
	return nil, w.srv.svc.Presence.LeaveGroup(ctx, w.presence, g.Name)
}

func handleTopicCreate(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.TopicCreate](data)
	if err != nil {
		return nil, err
	}
	name, _ := protocol.RawString(f.Name)
	desc, _ := protocol.RawString(f.Description)
	vis, _ := protocol.RawString(f.Visibility)
	res, err := w.srv.svc.Messaging.TopicCreate(ctx, w.presence, name, desc, vis)
	if err != nil {
		return nil, err
	}
	res.ReqID = h.ReqID
	return res, nil
}

func handleTopicList(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	topics, err := w.srv.svc.Messaging.TopicList(ctx, w.presence)
	if err != nil {
		return nil, err
	}
	return protocol.TopicList{Type: "topic_list_response", Topics: topics, ReqID: h.ReqID}, nil
}

// topicError echoes _reqId in the `id` key, as the reference does for
// topic_not_found (02 §10.2).
func topicError(h protocol.Head, err error) (any, error) {
	if se, ok := services.AsError(err); ok && se.Code == protocol.CodeTopicNotFound {
		return protocol.ErrorFrame{Type: "error", Code: se.Code, Message: se.Msg, ID: h.ReqID}, nil
	}
	return nil, err
}

func handleTopicJoin(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.TopicRef](data)
	if err != nil {
		return nil, err
	}
	ref, _ := protocol.RawString(f.Topic)
	role, _ := protocol.RawString(f.Role)
	if err := w.srv.svc.Messaging.TopicJoin(ctx, w.presence, ref, role); err != nil {
		return topicError(h, err)
	}
	return nil, nil
}

func handleTopicLeave(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.TopicRef](data)
	if err != nil {
		return nil, err
	}
	ref, _ := protocol.RawString(f.Topic)
	if err := w.srv.svc.Messaging.TopicLeave(ctx, w.presence, ref); err != nil {
		return topicError(h, err)
	}
	return nil, nil
}

func handleModeration(kick bool) frameHandler {
	return func(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
		f, err := decodeInto[protocol.Moderation](data)
		if err != nil {
			return nil, err
		}
		req := services.ModerationRequest{Kick: kick, All: protocol.RawIsTrue(f.All)}
		req.Target, _ = protocol.RawString(f.Target)
		if ms, ok := protocol.RawNumber(f.Stale); ok {
			d := time.Duration(ms) * time.Millisecond
			req.Stale = &d
		}
		res, err := w.srv.svc.Presence.Moderate(ctx, w.presence, req)
		if err != nil {
			return nil, err
		}
		typ := "disconnect_ack"
		if kick {
			typ = "kick_ack"
		}
		return protocol.ModerationAck{Type: typ, Kicked: res.Affected, Affected: res.Affected, SkippedControlPlane: res.SkippedControlPlane, ReqID: h.ReqID}, nil
	}
}

func handleBan(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.Moderation](data)
	if err != nil {
		return nil, err
	}
	target, _ := protocol.RawString(f.Target)
	name, err := w.srv.svc.Presence.Ban(ctx, w.presence, target)
	if err != nil {
		return nil, err
	}
	return protocol.BanAck{Type: "ban_ack", Banned: name, ReqID: h.ReqID}, nil
}

func handleUnban(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.Moderation](data)
	if err != nil {
		return nil, err
	}
	target, _ := protocol.RawString(f.Target)
	name, err := w.srv.svc.Presence.Unban(ctx, w.presence, target)
	if err != nil {
		return nil, err
	}
	return protocol.UnbanAck{Type: "unban_ack", Unbanned: name, ReqID: h.ReqID}, nil
}

func handleAuditQuery(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.AuditQuery](data)
	if err != nil {
		return nil, err
	}
	q := services.NewAuditQuery()
	if len(f.Limit) > 0 && string(f.Limit) != "null" {
		// A negative limit means "no limit" in the reference; the service
		// caps every answer at 500 rows (A3).
		if v, ok := protocol.RawNumber(f.Limit); ok && v == float64(int(v)) {
			q.Limit = int(v)
		} else {
			return nil, &services.Error{Code: protocol.CodeAuditQueryError, Msg: "limit must be an integer"}
		}
	}
	if len(f.Offset) > 0 {
		if v, ok := protocol.RawNumber(f.Offset); ok && v >= 0 && v == float64(int(v)) {
			q.Offset = int(v)
		} else {
			return nil, &services.Error{Code: protocol.CodeAuditQueryError, Msg: "offset must be a non-negative integer"}
		}
	}
	q.EventType, _ = protocol.RawString(f.EventType)
	res, err := w.srv.svc.Audit.Query(ctx, w.presence.MeshID, q)
	if err != nil {
		return nil, err
	}
	res.ReqID = h.ReqID
	return res, nil
}

func handleAuditVerify(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	res, err := w.srv.svc.Audit.Verify(ctx, w.presence.MeshID)
	if err != nil {
		return nil, err
	}
	res.ReqID = h.ReqID
	return res, nil
}
