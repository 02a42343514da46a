package handlers

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"strconv"
	"strings"

	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// extraHandlers are the frames of the real-time extras (04 §2-§9). Each
// decodes and checks its fields here, so a bad frame gets an error frame
// (invalid_argument, or the reference's own code) and changes nothing;
// the rules live in services.Realtime.
var extraHandlers = map[string]frameHandler{
	"watch":             handleWatch,
	"unwatch":           handleUnwatch,
	"watch_list":        handleWatchList,
	"create_stream":     handleCreateStream,
	"subscribe":         handleSubscribe,
	"unsubscribe":       handleUnsubscribe,
	"publish":           handlePublish,
	"list_streams":      handleListStreams,
	"mcp_register":      handleMCPRegister,
	"mcp_unregister":    handleMCPUnregister,
	"mcp_list":          handleMCPList,
	"mcp_call":          handleMCPCall,
	"mcp_call_response": handleMCPCallResponse,
	"set_clock":         handleSetClock,
	"pause_clock":       handlePauseClock,
	"resume_clock":      handleResumeClock,
	"get_clock":         handleGetClock,
	"set_state":         handleSetState,
	"get_state":         handleGetState,
	"list_state":        handleListState,
}

func badArg(msg string) error {
	return &services.Error{Code: protocol.CodeInvalidArgument, Msg: msg}
}

// absent is true for a missing field and for JSON null.
func absent(r json.RawMessage) bool {
	t := bytes.TrimSpace(r)
	return len(t) == 0 || string(t) == "null"
}

// needString returns a required string field; empty is refused unless
// allowEmpty.
func needString(r json.RawMessage, field string, allowEmpty bool) (string, error) {
	s, ok := protocol.RawString(r)
	if !ok {
		return "", badArg(field + " must be a string")
	}
	if s == "" && !allowEmpty {
		return "", badArg(field + " must be a non-empty string")
	}
	return s, nil
}

// optString returns an optional string field: nil when absent or null.
func optString(r json.RawMessage, field string) (*string, error) {
	if absent(r) {
		return nil, nil
	}
	s, ok := protocol.RawString(r)
	if !ok {
		return nil, badArg(field + " must be a string")
	}
	return &s, nil
}

// --- URL watches ---

func handleWatch(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.Watch](data)
	if err != nil {
		return nil, err
	}
	var req services.WatchRequest
	if req.URL, err = needString(f.URL, "url", false); err != nil {
		return nil, err
	}
	if req.Mode, err = optString(f.Mode, "mode"); err != nil {
		return nil, err
	}
	extract, err := optString(f.Extract, "extract")
	if err != nil {
		return nil, err
	}
	if extract != nil {
		req.Extract = *extract
	}
	if req.NotifyOn, err = optString(f.NotifyOn, "notify_on"); err != nil {
		return nil, err
	}
	if req.Label, err = optString(f.Label, "label"); err != nil {
		return nil, err
	}
	// 04 §3.1 port note: an interval that is not a number means the default.
	if v, ok := protocol.RawNumber(f.Interval); ok {
		req.Interval = &v
	}
	if !absent(f.Headers) {
		if err := json.Unmarshal(f.Headers, &req.Headers); err != nil || req.Headers == nil {
			return nil, badArg("headers must be an object of strings")
		}
	}
	ack, err := w.srv.svc.Realtime.Watch(ctx, w.presence, req)
	if err != nil {
		return nil, err
	}
	ack.ReqID = h.ReqID
	return ack, nil
}

func handleUnwatch(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.Unwatch](data)
	if err != nil {
		return nil, err
	}
	id, err := needString(f.WatchID, "watchId", false)
	if err != nil {
		return nil, err
	}
	ack := w.srv.svc.Realtime.Unwatch(w.presence, id)
	ack.ReqID = h.ReqID
	return ack, nil
}

func handleWatchList(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	return protocol.WatchListResult{Type: "watch_list_result", Watches: w.srv.svc.Realtime.WatchList(w.presence), ReqID: h.ReqID}, nil
}

// --- Streams ---

func streamArg(data []byte) (string, error) {
	f, err := decodeInto[protocol.StreamRef](data)
	if err != nil {
		return "", err
	}
	return needString(f.Stream, "stream", false)
}

func handleCreateStream(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.StreamName](data)
	if err != nil {
		return nil, err
	}
	name, err := needString(f.Name, "name", false)
	if err != nil {
		return nil, err
	}
	res, err := w.srv.svc.Realtime.CreateStream(ctx, w.presence, name)
	if err != nil {
		return nil, err
	}
	res.ReqID = h.ReqID
	return res, nil
}

func handleSubscribe(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	name, err := streamArg(data)
	if err != nil {
		return nil, err
	}
	w.srv.svc.Realtime.Subscribe(w.presence, name)
	return protocol.Subscribed{Type: "subscribed", Stream: name, ReqID: h.ReqID}, nil
}

// handleUnsubscribe never replies (04 §4.3).
func handleUnsubscribe(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	name, err := streamArg(data)
	if err != nil {
		return nil, err
	}
	w.srv.svc.Realtime.Unsubscribe(w.presence, name)
	return nil, nil
}

// handlePublish never replies (04 §4.4).
func handlePublish(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.Publish](data)
	if err != nil {
		return nil, err
	}
	name, err := needString(f.Stream, "stream", false)
	if err != nil {
		return nil, err
	}
	var payload json.RawMessage
	if len(f.Data) > 0 {
		payload = f.Data
	}
	return nil, w.srv.svc.Realtime.Publish(ctx, w.presence, name, payload)
}

func handleListStreams(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	streams, err := w.srv.svc.Realtime.ListStreams(ctx, w.presence)
	if err != nil {
		return nil, err
	}
	return protocol.StreamList{Type: "stream_list", Streams: streams, ReqID: h.ReqID}, nil
}

// --- MCP registry ---

func invalid(msg string) error { return &services.Error{Code: protocol.CodeInvalid, Msg: msg} }

// handleMCPRegister refuses a tools value that is not an array of named
// tools with code `invalid`, as 04 §5.1's port note has it.
func handleMCPRegister(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.MCPRegister](data)
	if err != nil {
		return nil, err
	}
	var reg services.MCPRegistration
	if reg.ServerName, err = needString(f.ServerName, "serverName", false); err != nil {
		return nil, err
	}
	desc, err := optString(f.Description, "description")
	if err != nil {
		return nil, err
	}
	if desc != nil {
		reg.Description = *desc
	}
	var tools []json.RawMessage
	if t := bytes.TrimSpace(f.Tools); len(t) == 0 || t[0] != '[' || json.Unmarshal(t, &tools) != nil {
		return nil, invalid("tools must be an array")
	}
	reg.Tools = make([]services.MCPToolSpec, 0, len(tools))
	for i, raw := range tools {
		var t protocol.MCPTool
		if b := bytes.TrimSpace(raw); len(b) == 0 || b[0] != '{' || json.Unmarshal(b, &t) != nil {
			return nil, invalid("tools[" + strconv.Itoa(i) + "] must be an object")
		}
		name, ok := protocol.RawString(t.Name)
		if !ok || name == "" {
			return nil, invalid("tools[" + strconv.Itoa(i) + "].name must be a non-empty string")
		}
		d, err := optString(t.Description, "tools["+strconv.Itoa(i)+"].description")
		if err != nil {
			return nil, invalid(err.(*services.Error).Msg)
		}
		spec := services.MCPToolSpec{Name: name, InputSchema: t.InputSchema}
		if d != nil {
			spec.Description = *d
		}
		reg.Tools = append(reg.Tools, spec)
	}
	reg.Persistent = jsTruthy(f.Persistent)
	ack, err := w.srv.svc.Realtime.RegisterMCP(w.presence, reg)
	if err != nil {
		return nil, err
	}
	ack.ReqID = h.ReqID
	return ack, nil
}

// handleMCPUnregister never replies (04 §5.2).
func handleMCPUnregister(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.MCPServerRef](data)
	if err != nil {
		return nil, err
	}
	name, err := needString(f.ServerName, "serverName", false)
	if err != nil {
		return nil, err
	}
	w.srv.svc.Realtime.UnregisterMCP(w.presence, name)
	return nil, nil
}

func handleMCPList(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	return protocol.MCPListResult{Type: "mcp_list_result", Servers: w.srv.svc.Realtime.ListMCP(w.presence), ReqID: h.ReqID}, nil
}

// handleMCPCall replies at once when the call cannot be forwarded;
// otherwise the reply comes later, from the host's answer or the timeout,
// and this read loop goes on.
func handleMCPCall(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.MCPCall](data)
	if err != nil {
		return nil, err
	}
	req := services.MCPCallRequest{ReqID: h.ReqID}
	if req.ServerName, err = needString(f.ServerName, "serverName", false); err != nil {
		return nil, err
	}
	if req.ToolName, err = needString(f.ToolName, "toolName", false); err != nil {
		return nil, err
	}
	if len(f.Args) > 0 {
		req.Args = f.Args
	}
	if res := w.srv.svc.Realtime.CallMCP(ctx, w.presence, req); res != nil {
		return *res, nil
	}
	return nil, nil
}

// handleMCPCallResponse never replies (04 §5.5).
func handleMCPCallResponse(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.MCPCallResponse](data)
	if err != nil {
		return nil, err
	}
	id, err := needString(f.CallID, "callId", false)
	if err != nil {
		return nil, err
	}
	errText, err := optString(f.Error, "error")
	if err != nil {
		return nil, err
	}
	var result json.RawMessage
	if len(f.Result) > 0 {
		result = f.Result // JSON null counts as a result
	}
	msg := ""
	if errText != nil {
		msg = *errText
	}
	w.srv.svc.Realtime.RespondMCP(w.presence, id, result, msg)
	return nil, nil
}

// --- Mesh clock ---

func handleSetClock(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.SetClock](data)
	if err != nil {
		return nil, err
	}
	st := w.srv.svc.Realtime.SetClock(w.presence, jsNumber(f.Speed))
	st.ReqID = h.ReqID
	return st, nil
}

func handlePauseClock(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	st, err := w.srv.svc.Realtime.PauseClock(w.presence)
	if err != nil {
		return nil, err
	}
	st.ReqID = h.ReqID
	return st, nil
}

func handleResumeClock(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	st, err := w.srv.svc.Realtime.ResumeClock(w.presence)
	if err != nil {
		return nil, err
	}
	st.ReqID = h.ReqID
	return st, nil
}

func handleGetClock(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	st := w.srv.svc.Realtime.GetClock(w.presence)
	st.ReqID = h.ReqID
	return st, nil
}

// --- Shared state ---

// handleSetState never replies (04 §7.1): clients match state_result to
// get_state FIFO. A missing key is an error frame (H8); a missing or null
// value is silently ignored, as the reference does.
func handleSetState(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.SetState](data)
	if err != nil {
		return nil, err
	}
	key, err := needString(f.Key, "key", true)
	if err != nil {
		return nil, err
	}
	return nil, w.srv.svc.Realtime.SetState(ctx, w.presence, key, f.Value)
}

func handleGetState(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.StateKey](data)
	if err != nil {
		return nil, err
	}
	key, err := needString(f.Key, "key", true)
	if err != nil {
		return nil, err
	}
	res, err := w.srv.svc.Realtime.GetState(ctx, w.presence, key)
	if err != nil {
		return nil, err
	}
	res.ReqID = h.ReqID
	return res, nil
}

func handleListState(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	entries, err := w.srv.svc.Realtime.ListState(ctx, w.presence)
	if err != nil {
		return nil, err
	}
	return protocol.StateList{Type: "state_list", Entries: entries, ReqID: h.ReqID}, nil
}

// --- JavaScript coercions the reference applies ---

// jsTruthy is JavaScript's !!v for a JSON value: false for absent, null,
// false, 0 and "", true for anything else.
func jsTruthy(r json.RawMessage) bool {
	t := bytes.TrimSpace(r)
	switch {
	case len(t) == 0, string(t) == "null", string(t) == "false", string(t) == `""`:
		return false
	case t[0] == '-' || t[0] >= '0' && t[0] <= '9':
		v, ok := protocol.RawNumber(t)
		return ok && v != 0
	}
	return true
}

// jsNumber is JavaScript's Number(v) for a JSON value, as far as set_clock
// needs it: numbers as they are, numeric strings parsed ("" is 0), true 1,
// false and null 0, anything else NaN.
func jsNumber(r json.RawMessage) float64 {
	t := bytes.TrimSpace(r)
	switch {
	case len(t) == 0:
		return math.NaN()
	case string(t) == "null", string(t) == "false":
		return 0
	case string(t) == "true":
		return 1
	case t[0] == '"':
		s, _ := protocol.RawString(t)
		s = strings.TrimSpace(s)
		switch s {
		case "":
			return 0
		case "Infinity", "+Infinity":
			return math.Inf(1)
		case "-Infinity":
			return math.Inf(-1)
		}
		if strings.ContainsAny(s, "iInN_xX") { // Go accepts inf, nan, hex and underscores; JavaScript's decimal form does not
			return math.NaN()
		}
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return math.NaN()
		}
		return v
	}
	if v, ok := protocol.RawNumber(t); ok {
		return v
	}
	return math.NaN()
}
