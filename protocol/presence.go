package protocol

import "encoding/json"

// Frames of the presence area (03 §6).

// SetStatus is `{"type":"set_status","status"}`.
type SetStatus struct {
	Status json.RawMessage `json:"status"`
}

// SetSummary is `{"type":"set_summary","summary"}`.
type SetSummary struct {
	Summary json.RawMessage `json:"summary"`
}

// SetVisible is `{"type":"set_visible","visible"}`.
type SetVisible struct {
	Visible json.RawMessage `json:"visible"`
}

// SetStats is `{"type":"set_stats","stats"}`; stats is kept verbatim.
type SetStats struct {
	Stats json.RawMessage `json:"stats"`
}

// Moderation is disconnect, kick, ban and unban.
type Moderation struct {
	Target json.RawMessage `json:"target"`
	Stale  json.RawMessage `json:"stale"`
	All    json.RawMessage `json:"all"`
}

// Ack is the `ack` frame: the answer to send, and (with queued:false and
// no error) to set_visible and set_profile.
type Ack struct {
	Type      string `json:"type"`
	ID        string `json:"id"`
	MessageID string `json:"messageId"`
	Queued    bool   `json:"queued"`
	Error     string `json:"error,omitempty"`
	ReqID     string `json:"_reqId,omitempty"`
}

// PeerInfo is one entry of peers_list (03 §6.6).
type PeerInfo struct {
	Pubkey       string          `json:"pubkey"`
	MemberPubkey string          `json:"memberPubkey"`
	DisplayName  string          `json:"displayName"`
	Status       string          `json:"status"`
	Summary      *string         `json:"summary"`
	Groups       []Group         `json:"groups"`
	SessionID    string          `json:"sessionId"`
	ConnectedAt  string          `json:"connectedAt"`
	Cwd          string          `json:"cwd"`
	PeerRole     string          `json:"peerRole"`
	Hostname     string          `json:"hostname,omitempty"`
	PeerType     string          `json:"peerType,omitempty"`
	Channel      string          `json:"channel,omitempty"`
	Model        string          `json:"model,omitempty"`
	Stats        json.RawMessage `json:"stats,omitempty"`
	Visible      *bool           `json:"visible,omitempty"`
	Profile      json.RawMessage `json:"profile,omitempty"`
	// InGrace marks a presence whose socket dropped and whose lease has
	// not expired yet (meshbroker's own; old clients ignore it): a message
	// to it is held until it reattaches or the lease ends. LeaseExpiresAt
	// is when the lease ends.
	InGrace        bool   `json:"inGrace,omitempty"`
	LeaseExpiresAt string `json:"leaseExpiresAt,omitempty"`
}

// PeersList answers list_peers.
type PeersList struct {
	Type  string     `json:"type"`
	Peers []PeerInfo `json:"peers"`
	ReqID string     `json:"_reqId,omitempty"`
}

// ModerationAck answers disconnect (disconnect_ack) and kick (kick_ack).
type ModerationAck struct {
	Type                string   `json:"type"`
	Kicked              []string `json:"kicked"`
	Affected            []string `json:"affected"`
	SkippedControlPlane []string `json:"skipped_control_plane,omitempty"`
	ReqID               string   `json:"_reqId,omitempty"`
}

// BanAck answers ban.
type BanAck struct {
	Type   string `json:"type"`
	Banned string `json:"banned"`
	ReqID  string `json:"_reqId,omitempty"`
}

// UnbanAck answers unban.
type UnbanAck struct {
	Type     string `json:"type"`
	Unbanned string `json:"unbanned"`
	ReqID    string `json:"_reqId,omitempty"`
}
