package services

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"

	"github.com/claudemesh/meshbroker/protocol"
)

// The peer-hosted MCP registry (04 §5). A presence registers an MCP server
// it hosts; other presences list it and call its tools, and the broker
// forwards each call to the host and its answer back. Entries live in
// memory, keyed by (mesh, server name), and are persisted for a restart
// (realtime_persist.go). A persistent entry survives its
// host's eviction offline and comes back when the member returns with a
// member hello; any other entry dies with its host.

type mcpKey struct{ meshID, name string }

// mcpServer is one registry entry. Guarded by Realtime.mu.
type mcpServer struct {
	meshID, name, description string
	tools                     []MCPToolSpec
	hostedBy                  string // the host connection's display name at register or restore
	persistent, online        bool
	presenceID                string // host; "" while offline
	memberID                  string
	registeredAt              time.Time
	offlineSince              time.Time // zero while online
	seq                       uint64    // registration order; an overwrite keeps its place
}

// mcpCall is one forwarded call waiting for its host's answer.
type mcpCall struct {
	// Static once the call is in Realtime.calls.
	id, meshID, serverName  string
	callerPresenceID, reqID string
	hostPresenceID          string
	timeout                 time.Duration
	timer                   *time.Timer // stopped by whoever removes the call from Realtime.calls, under mu
}

// MCPToolSpec is one tool of a registration.
type MCPToolSpec struct {
	Name        string
	Description string
	InputSchema json.RawMessage
}

// MCPRegistration is a decoded mcp_register frame.
type MCPRegistration struct {
	ServerName  string
	Description string
	Tools       []MCPToolSpec
	Persistent  bool
}

// RegisterMCP puts c's server in the registry, overwriting an entry of the
// same member (its previous host is not told), and tells the mesh's other
// presences. Errors: name_taken when another member's entry, online or
// offline, holds the name (R3).
func (r *Realtime) RegisterMCP(c *Conn, reg MCPRegistration) (protocol.MCPRegisterAck, error) {
	name := r.presence.DisplayName(c)
	k := mcpKey{c.MeshID, reg.ServerName}
	r.mu.Lock()
	old := r.servers[k]
	if old != nil && old.memberID != c.MemberID {
		r.mu.Unlock()
		return protocol.MCPRegisterAck{}, newError(protocol.CodeNameTaken, fmt.Sprintf("MCP server %q is hosted by %s", reg.ServerName, old.hostedBy))
	}
	e := &mcpServer{
		meshID: c.MeshID, name: reg.ServerName, description: reg.Description, tools: reg.Tools, hostedBy: name,
		persistent: reg.Persistent, online: true, presenceID: c.PresenceID, memberID: c.MemberID, registeredAt: r.now(),
	}
	if old != nil {
		e.seq = old.seq
	} else {
		r.seq++
		e.seq = r.seq
	}
	r.servers[k] = e
	r.markDirtyLocked(c.MeshID)
	r.mu.Unlock()

	toolNames := make([]string, len(reg.Tools))
	for i, t := range reg.Tools {
		toolNames[i] = t.Name
	}
	r.broadcastOthers(c.MeshID, c.PresenceID, r.systemPush(c.MeshID, "mcp_registered", "low",
		protocol.MCPRegistered{ServerName: reg.ServerName, Description: reg.Description, Tools: toolNames, HostedBy: name}))
	r.log.Info("mcp registered", "presence_id", c.PresenceID, "mesh", c.MeshID, "server", reg.ServerName, "tools", len(reg.Tools), "persistent", reg.Persistent)
	return protocol.MCPRegisterAck{Type: "mcp_register_ack", ServerName: reg.ServerName, ToolCount: len(reg.Tools)}, nil
}

// UnregisterMCP deletes the entry if c hosts it and tells the other
// presences; otherwise it does nothing (an offline entry has no host, so
// it can only be overwritten).
func (r *Realtime) UnregisterMCP(c *Conn, serverName string) {
	k := mcpKey{c.MeshID, serverName}
	r.mu.Lock()
	e := r.servers[k]
	mine := e != nil && e.presenceID == c.PresenceID
	if mine {
		delete(r.servers, k)
		r.markDirtyLocked(c.MeshID)
	}
	r.mu.Unlock()
	if !mine {
		return
	}
	r.broadcastOthers(c.MeshID, c.PresenceID, r.systemPush(c.MeshID, "mcp_unregistered", "low",
		protocol.MCPHostEvent{ServerName: serverName, HostedBy: r.presence.DisplayName(c)}))
	r.log.Info("mcp unregistered", "presence_id", c.PresenceID, "mesh", c.MeshID, "server", serverName)
}

// ListMCP returns every entry of the caller's mesh, offline ones too, in
// registration order.
func (r *Realtime) ListMCP(c *Conn) []protocol.MCPServerInfo {
	r.mu.Lock()
	var entries []*mcpServer
	for _, e := range r.servers {
		if e.meshID == c.MeshID {
			entries = append(entries, e)
		}
	}
	slices.SortFunc(entries, func(a, b *mcpServer) int { return cmp.Compare(a.seq, b.seq) })
	out := make([]protocol.MCPServerInfo, 0, len(entries))
	for _, e := range entries {
		info := protocol.MCPServerInfo{Name: e.name, Description: e.description, HostedBy: e.hostedBy, Online: e.online, Tools: make([]protocol.MCPToolInfo, len(e.tools))}
		for i, t := range e.tools {
			info.Tools[i] = protocol.MCPToolInfo{Name: t.Name, Description: t.Description}
		}
		if !e.offlineSince.IsZero() {
			info.OfflineSince = protocol.ISO(e.offlineSince)
		}
		out = append(out, info)
	}
	r.mu.Unlock()
	return out
}

// MCPCallRequest is a decoded mcp_call frame; Args is nil when absent.
type MCPCallRequest struct {
	ServerName, ToolName string
	Args                 json.RawMessage
	ReqID                string
}

// CallMCP resolves a call (04 §5.4). It returns the reply when the call
// ends at once (unknown, offline or unavailable host); otherwise it
// forwards the call and returns nil, and the reply reaches the caller's
// presence later: the host's answer, or a timeout. The caller's read loop
// never waits.
func (r *Realtime) CallMCP(ctx context.Context, c *Conn, req MCPCallRequest) *protocol.MCPCallResult {
	fail := func(msg string) *protocol.MCPCallResult {
		return &protocol.MCPCallResult{Type: "mcp_call_result", Error: msg, ReqID: req.ReqID}
	}
	if r.managedServiceRunning(ctx, c.MeshID, req.ServerName) {
		// Runner-managed services (mcp_deploy) are out of scope: meshbroker
		// has no runner to forward to, which the reference reports this way.
		return fail("runner call failed: no MCP runner is configured on this broker")
	}
	k := mcpKey{c.MeshID, req.ServerName}
	r.mu.Lock()
	e := r.servers[k]
	if e == nil {
		r.mu.Unlock()
		return fail(fmt.Sprintf("MCP server %q not found in mesh", req.ServerName))
	}
	if !e.online {
		msg := fmt.Sprintf("Server '%s' is offline — hosted by %s", req.ServerName, e.hostedBy)
		if !e.offlineSince.IsZero() {
			msg += " who disconnected " + relativeAgo(r.now().Sub(e.offlineSince))
		}
		r.mu.Unlock()
		return fail(msg + ". It will restore when they reconnect.")
	}
	hostID := e.presenceID
	r.mu.Unlock()

	host := r.presence.Get(hostID)
	if host == nil {
		// Only reachable if eviction raced this call: its hook has run or is
		// about to; settle the entry the way the reference does.
		r.mu.Lock()
		if r.servers[k] == e && e.presenceID == hostID {
			r.takeOfflineLocked(k, e)
		}
		r.mu.Unlock()
		return fail(fmt.Sprintf("MCP server %q host disconnected", req.ServerName))
	}
	out := r.presence.Outbox(host)
	if out == nil {
		return fail(hostUnavailable(req.ServerName))
	}

	call := &mcpCall{id: protocol.NewUUID(), meshID: c.MeshID, serverName: req.ServerName, callerPresenceID: c.PresenceID, reqID: req.ReqID, hostPresenceID: hostID}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return fail("broker is shutting down")
	}
	call.timeout = r.callTimeout
	call.timer = time.AfterFunc(call.timeout, func() { r.expireCall(call.id) })
	r.calls[call.id] = call
	r.mu.Unlock()

	f := protocol.MustEncode(protocol.MCPCallForward{
		Type: "mcp_call_forward", CallID: call.id, ServerName: req.ServerName, ToolName: req.ToolName, Args: req.Args, CallerName: r.presence.DisplayName(c),
	})
	if !out.Offer(f) {
		// The host's socket closed since we looked: it is in grace now.
		if r.takeCall(call.id, "") != nil {
			return fail(hostUnavailable(req.ServerName))
		}
		return nil
	}
	r.log.Debug("mcp call forwarded", "call_id", call.id, "server", req.ServerName, "caller", c.PresenceID, "host", hostID)
	return nil
}

// hostUnavailable is the error of a call to a host in grace (R3): it fails
// at once instead of after the 30 s timeout. The reply keeps the
// mcp_call_result shape, so the code leads the error text.
func hostUnavailable(serverName string) string {
	return fmt.Sprintf("%s: the host of MCP server %q is reconnecting; try again shortly", protocol.CodeHostUnavailable, serverName)
}

// RespondMCP completes a pending call with the host's answer. An unknown,
// late or duplicate call id, or an answer from a presence other than the
// call's host, is ignored.
func (r *Realtime) RespondMCP(c *Conn, callID string, result json.RawMessage, errText string) {
	call := r.takeCall(callID, c.PresenceID)
	if call == nil {
		r.log.Debug("mcp call response ignored", "call_id", callID, "presence_id", c.PresenceID)
		return
	}
	r.finishCall(call, result, errText)
}

// takeCall removes a pending call and stops its timer; host, when not
// empty, must be the call's host. Nil when there is no such call.
func (r *Realtime) takeCall(id, host string) *mcpCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	call := r.calls[id]
	if call == nil || (host != "" && call.hostPresenceID != host) {
		return nil
	}
	delete(r.calls, id)
	call.timer.Stop()
	return call
}

// expireCall is a call's deadline.
func (r *Realtime) expireCall(id string) {
	if call := r.takeCall(id, ""); call != nil {
		r.finishCall(call, nil, "MCP call timed out ("+strconv.FormatFloat(call.timeout.Seconds(), 'f', -1, 64)+"s)")
	}
}

// finishCall replies to the caller's presence, on whichever socket it has now.
func (r *Realtime) finishCall(call *mcpCall, result json.RawMessage, errText string) {
	r.sendTo(call.callerPresenceID, protocol.MustEncode(protocol.MCPCallResult{Type: "mcp_call_result", Result: result, Error: errText, ReqID: call.reqID}))
}

// takeOfflineLocked applies a host's departure to its entry: persistent
// entries go offline, others are deleted. Realtime.mu must be held.
func (r *Realtime) takeOfflineLocked(k mcpKey, e *mcpServer) {
	r.markDirtyLocked(k.meshID)
	if !e.persistent {
		delete(r.servers, k)
		return
	}
	e.online, e.offlineSince, e.presenceID = false, r.now(), ""
}

// evictMCPLocked is 04 §2 step 7 for c, with the port's early failure of
// the calls c was hosting; calls c made are dropped (their reply has
// nowhere to go). No broadcast. Realtime.mu must be held.
func (r *Realtime) evictMCPLocked(c *Conn) (offline, removed int, failed []*mcpCall) {
	for k, e := range r.servers {
		if e.presenceID != c.PresenceID {
			continue
		}
		if e.persistent {
			offline++
		} else {
			removed++
		}
		r.takeOfflineLocked(k, e)
	}
	for id, call := range r.calls {
		switch c.PresenceID {
		case call.hostPresenceID:
			failed = append(failed, call)
		case call.callerPresenceID:
		default:
			continue
		}
		call.timer.Stop()
		delete(r.calls, id)
	}
	return offline, removed, failed
}

// restoreMCP brings the member's offline entries of the mesh back on its
// new presence and tells every presence of the mesh, c included (04 §5.6).
func (r *Realtime) restoreMCP(c *Conn) {
	name := r.presence.DisplayName(c)
	r.mu.Lock()
	var restored []*mcpServer
	for _, e := range r.servers {
		if e.meshID == c.MeshID && e.memberID == c.MemberID && !e.online {
			e.online, e.presenceID, e.offlineSince, e.hostedBy = true, c.PresenceID, time.Time{}, name
			restored = append(restored, e)
			r.markDirtyLocked(c.MeshID)
		}
	}
	slices.SortFunc(restored, func(a, b *mcpServer) int { return cmp.Compare(a.seq, b.seq) })
	names := make([]string, len(restored))
	for i, e := range restored {
		names[i] = e.name
	}
	r.mu.Unlock()
	for _, s := range names {
		r.presence.Broadcast(c.MeshID, r.systemPush(c.MeshID, "mcp_restored", "low", protocol.MCPHostEvent{ServerName: s, HostedBy: name}), nil)
		r.log.Info("mcp restored", "server", s, "presence_id", c.PresenceID, "mesh", c.MeshID)
	}
}

// managedServiceRunning reports whether mesh.service has a running service
// of that name (04 §5.4 step 1). A failed lookup counts as none.
func (r *Realtime) managedServiceRunning(ctx context.Context, meshID, name string) bool {
	var n int64
	err := r.db.WithContext(ctx).Raw("SELECT count(*) FROM "+r.db.Table("service")+" WHERE mesh_id = ? AND name = ? AND status = 'running'", meshID, name).Scan(&n).Error
	if err != nil {
		r.log.Warn("mcp call: managed service lookup", "mesh", meshID, "err", err)
		return false
	}
	return n > 0
}

// relativeAgo renders an offline duration the reference's way: whole
// seconds under a minute, minutes under an hour, else hours, each rounded
// to the nearest.
func relativeAgo(d time.Duration) string {
	ms := float64(d.Milliseconds())
	switch {
	case ms < 60_000:
		return strconv.FormatFloat(jsRound(ms/1000), 'f', -1, 64) + "s ago"
	case ms < 3_600_000:
		return strconv.FormatFloat(jsRound(ms/60_000), 'f', -1, 64) + "m ago"
	}
	return strconv.FormatFloat(jsRound(ms/3_600_000), 'f', -1, 64) + "h ago"
}

// jsRound is Math.round: halves round up.
func jsRound(x float64) float64 { return math.Floor(x + 0.5) }
