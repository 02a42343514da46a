package protocol

import "encoding/json"

// Frames of the real-time extras (04 §3-§7): URL watches, streams, the
// peer-hosted MCP registry, the mesh clock and shared state. Inbound fields
// stay raw so the edge can tell absent from wrong-typed and answer
// invalid_argument; outbound structs carry the reference's exact keys.

// Error codes of the extras.
const (
	CodeNoClock         Code = "no_clock"         // pause_clock / resume_clock without a clock (04 §6)
	CodeNameTaken       Code = "name_taken"       // mcp_register of a name another member hosts (R3)
	CodeHostUnavailable Code = "host_unavailable" // prefix of mcp_call_result.error for a host in grace (R3)
	CodeLimitExceeded   Code = "limit_exceeded"   // watch caps per member and per mesh (R2)
)

// --- URL watches (04 §3) ---

// Watch is `{"type":"watch","url","mode"?,"extract"?,"interval"?,"notify_on"?,"headers"?,"label"?}`.
type Watch struct {
	URL      json.RawMessage `json:"url"`
	Mode     json.RawMessage `json:"mode"`
	Extract  json.RawMessage `json:"extract"`
	Interval json.RawMessage `json:"interval"`
	NotifyOn json.RawMessage `json:"notify_on"`
	Headers  json.RawMessage `json:"headers"`
	Label    json.RawMessage `json:"label"`
}

// Unwatch is `{"type":"unwatch","watchId"}`.
type Unwatch struct {
	WatchID json.RawMessage `json:"watchId"`
}

// WatchAck answers watch and unwatch. Interval is in seconds; unwatch sends 0.
type WatchAck struct {
	Type     string  `json:"type"` // "watch_ack"
	WatchID  string  `json:"watchId"`
	URL      string  `json:"url"`
	Mode     string  `json:"mode"`
	Interval float64 `json:"interval"`
	ReqID    string  `json:"_reqId,omitempty"`
}

// WatchInfo is one entry of watch_list_result. LastCheck is absent until a
// check succeeded.
type WatchInfo struct {
	ID        string  `json:"id"`
	URL       string  `json:"url"`
	Mode      string  `json:"mode"`
	Label     *string `json:"label,omitempty"`
	Interval  float64 `json:"interval"`
	LastHash  string  `json:"lastHash"`
	LastValue string  `json:"lastValue"`
	LastCheck string  `json:"lastCheck,omitempty"`
	CreatedAt string  `json:"createdAt"`
}

// WatchListResult answers watch_list with the caller presence's watches in
// creation order.
type WatchListResult struct {
	Type    string      `json:"type"` // "watch_list_result"
	Watches []WatchInfo `json:"watches"`
	ReqID   string      `json:"_reqId,omitempty"`
}

// WatchTriggered is the eventData of the `watch_triggered` system push.
type WatchTriggered struct {
	WatchID  string  `json:"watchId"`
	URL      string  `json:"url"`
	Label    *string `json:"label,omitempty"`
	Mode     string  `json:"mode"`
	OldValue string  `json:"oldValue"`
	NewValue string  `json:"newValue"`
}

// --- Streams (04 §4) ---

// StreamName is create_stream (`name`).
type StreamName struct {
	Name json.RawMessage `json:"name"`
}

// StreamRef is subscribe and unsubscribe (`stream`).
type StreamRef struct {
	Stream json.RawMessage `json:"stream"`
}

// Publish is `{"type":"publish","stream","data"}`; data is any JSON.
type Publish struct {
	Stream json.RawMessage `json:"stream"`
	Data   json.RawMessage `json:"data"`
}

// StreamCreated answers create_stream.
type StreamCreated struct {
	Type  string `json:"type"` // "stream_created"
	ID    string `json:"id"`
	Name  string `json:"name"`
	ReqID string `json:"_reqId,omitempty"`
}

// Subscribed answers subscribe.
type Subscribed struct {
	Type   string `json:"type"` // "subscribed"
	Stream string `json:"stream"`
	ReqID  string `json:"_reqId,omitempty"`
}

// StreamData is the fan-out of a publish; Data is omitted when the publish
// had none.
type StreamData struct {
	Type        string          `json:"type"` // "stream_data"
	Stream      string          `json:"stream"`
	Data        json.RawMessage `json:"data,omitempty"`
	PublishedBy string          `json:"publishedBy"`
}

// StreamInfo is one entry of stream_list.
type StreamInfo struct {
	ID              string `json:"id"`
	Name            string `json:"name"`
	CreatedBy       string `json:"createdBy"`
	CreatedAt       string `json:"createdAt"`
	SubscriberCount int    `json:"subscriberCount"`
}

// StreamList answers list_streams.
type StreamList struct {
	Type    string       `json:"type"` // "stream_list"
	Streams []StreamInfo `json:"streams"`
	ReqID   string       `json:"_reqId,omitempty"`
}

// --- Peer-hosted MCP registry (04 §5) ---

// MCPRegister is `{"type":"mcp_register","serverName","description","tools","persistent"?}`.
type MCPRegister struct {
	ServerName  json.RawMessage `json:"serverName"`
	Description json.RawMessage `json:"description"`
	Tools       json.RawMessage `json:"tools"`
	Persistent  json.RawMessage `json:"persistent"`
}

// MCPTool is one tool of an mcp_register frame.
type MCPTool struct {
	Name        json.RawMessage `json:"name"`
	Description json.RawMessage `json:"description"`
	InputSchema json.RawMessage `json:"inputSchema"`
}

// MCPServerRef is mcp_unregister (`serverName`).
type MCPServerRef struct {
	ServerName json.RawMessage `json:"serverName"`
}

// MCPCall is `{"type":"mcp_call","serverName","toolName","args"}`.
type MCPCall struct {
	ServerName json.RawMessage `json:"serverName"`
	ToolName   json.RawMessage `json:"toolName"`
	Args       json.RawMessage `json:"args"`
}

// MCPCallResponse is the host's `{"type":"mcp_call_response","callId","result"?,"error"?}`.
type MCPCallResponse struct {
	CallID json.RawMessage `json:"callId"`
	Result json.RawMessage `json:"result"`
	Error  json.RawMessage `json:"error"`
}

// MCPRegisterAck answers mcp_register.
type MCPRegisterAck struct {
	Type       string `json:"type"` // "mcp_register_ack"
	ServerName string `json:"serverName"`
	ToolCount  int    `json:"toolCount"`
	ReqID      string `json:"_reqId,omitempty"`
}

// MCPRegistered is the eventData of `mcp_registered`.
type MCPRegistered struct {
	ServerName  string   `json:"serverName"`
	Description string   `json:"description"`
	Tools       []string `json:"tools"`
	HostedBy    string   `json:"hostedBy"`
}

// MCPHostEvent is the eventData of `mcp_unregistered` and `mcp_restored`.
type MCPHostEvent struct {
	ServerName string `json:"serverName"`
	HostedBy   string `json:"hostedBy"`
}

// MCPToolInfo is one tool of an mcp_list_result server (no inputSchema).
type MCPToolInfo struct {
	Name        string `json:"name"`
	Description string `json:"description"`
}

// MCPServerInfo is one server of mcp_list_result.
type MCPServerInfo struct {
	Name         string        `json:"name"`
	Description  string        `json:"description"`
	HostedBy     string        `json:"hostedBy"`
	Tools        []MCPToolInfo `json:"tools"`
	Online       bool          `json:"online"`
	OfflineSince string        `json:"offlineSince,omitempty"`
}

// MCPListResult answers mcp_list.
type MCPListResult struct {
	Type    string          `json:"type"` // "mcp_list_result"
	Servers []MCPServerInfo `json:"servers"`
	ReqID   string          `json:"_reqId,omitempty"`
}

// MCPCallResult answers mcp_call. Result is present whenever the host sent
// one (JSON null counts); Error only when non-empty.
type MCPCallResult struct {
	Type   string          `json:"type"` // "mcp_call_result"
	Result json.RawMessage `json:"result,omitempty"`
	Error  string          `json:"error,omitempty"`
	ReqID  string          `json:"_reqId,omitempty"`
}

// MCPCallForward carries a call to its host; Args is omitted when the
// caller sent none.
type MCPCallForward struct {
	Type       string          `json:"type"` // "mcp_call_forward"
	CallID     string          `json:"callId"`
	ServerName string          `json:"serverName"`
	ToolName   string          `json:"toolName"`
	Args       json.RawMessage `json:"args,omitempty"`
	CallerName string          `json:"callerName"`
}

// --- Mesh clock (04 §6) ---

// SetClock is `{"type":"set_clock","speed"}`.
type SetClock struct {
	Speed json.RawMessage `json:"speed"`
}

// ClockStatus answers set_clock, pause_clock, resume_clock and get_clock.
type ClockStatus struct {
	Type      string  `json:"type"` // "clock_status"
	Speed     float64 `json:"speed"`
	Paused    bool    `json:"paused"`
	Tick      int64   `json:"tick"`
	SimTime   string  `json:"simTime"`
	StartedAt string  `json:"startedAt"`
	ReqID     string  `json:"_reqId,omitempty"`
}

// Tick is the eventData of the `tick` system push.
type Tick struct {
	Tick    int64   `json:"tick"`
	SimTime string  `json:"simTime"`
	Speed   float64 `json:"speed"`
}

// --- Shared state (04 §7) ---

// SetState is `{"type":"set_state","key","value"}`.
type SetState struct {
	Key   json.RawMessage `json:"key"`
	Value json.RawMessage `json:"value"`
}

// StateKey is get_state (`key`).
type StateKey struct {
	Key json.RawMessage `json:"key"`
}

// StateResult answers get_state. A miss echoes the key with value null and
// empty updatedBy/updatedAt, so Value has no omitempty: nil encodes null.
type StateResult struct {
	Type      string          `json:"type"` // "state_result"
	Key       string          `json:"key"`
	Value     json.RawMessage `json:"value"`
	UpdatedBy string          `json:"updatedBy"`
	UpdatedAt string          `json:"updatedAt"`
	ReqID     string          `json:"_reqId,omitempty"`
}

// StateEntry is one entry of state_list.
type StateEntry struct {
	Key       string          `json:"key"`
	Value     json.RawMessage `json:"value"`
	UpdatedBy string          `json:"updatedBy"`
	UpdatedAt string          `json:"updatedAt"`
}

// StateList answers list_state, ordered by key.
type StateList struct {
	Type    string       `json:"type"` // "state_list"
	Entries []StateEntry `json:"entries"`
	ReqID   string       `json:"_reqId,omitempty"`
}

// StateChange tells every other presence of the mesh about a set_state.
type StateChange struct {
	Type      string          `json:"type"` // "state_change"
	Key       string          `json:"key"`
	Value     json.RawMessage `json:"value"`
	UpdatedBy string          `json:"updatedBy"`
}
