package protocol

import "encoding/json"

// Hello is the member hello (01 §2.1). Fields whose JSON type a check must
// see (timestamp, sessionPubkey, pid, groups) stay raw.
type Hello struct {
	Type          string          `json:"type"`
	MeshID        string          `json:"meshId"`
	MemberID      string          `json:"memberId"`
	Pubkey        string          `json:"pubkey"`
	Timestamp     json.RawMessage `json:"timestamp"`
	Signature     string          `json:"signature"`
	SessionID     json.RawMessage `json:"sessionId"`
	SessionPubkey json.RawMessage `json:"sessionPubkey"`
	DisplayName   json.RawMessage `json:"displayName"`
	Pid           json.RawMessage `json:"pid"`
	Cwd           json.RawMessage `json:"cwd"`
	Groups        json.RawMessage `json:"groups"`
	Hostname      json.RawMessage `json:"hostname"`
	PeerType      json.RawMessage `json:"peerType"`
	Channel       json.RawMessage `json:"channel"`
	Model         json.RawMessage `json:"model"`
	ResumeToken   json.RawMessage `json:"resumeToken"`
}

// Attestation is a session_hello's parentAttestation object.
type Attestation struct {
	SessionPubkey      json.RawMessage `json:"sessionPubkey"`
	ParentMemberPubkey json.RawMessage `json:"parentMemberPubkey"`
	ExpiresAt          json.RawMessage `json:"expiresAt"`
	Signature          json.RawMessage `json:"signature"`
}

// SessionHello is the per-session hello (01 §3.1).
type SessionHello struct {
	Type               string          `json:"type"`
	MeshID             string          `json:"meshId"`
	ParentMemberID     json.RawMessage `json:"parentMemberId"`
	ParentMemberPubkey json.RawMessage `json:"parentMemberPubkey"`
	SessionPubkey      json.RawMessage `json:"sessionPubkey"`
	ParentAttestation  json.RawMessage `json:"parentAttestation"`
	Timestamp          json.RawMessage `json:"timestamp"`
	Signature          json.RawMessage `json:"signature"`
	SessionID          json.RawMessage `json:"sessionId"`
	Pid                json.RawMessage `json:"pid"`
	Cwd                json.RawMessage `json:"cwd"`
	DisplayName        json.RawMessage `json:"displayName"`
	Groups             json.RawMessage `json:"groups"`
	Hostname           json.RawMessage `json:"hostname"`
	PeerType           json.RawMessage `json:"peerType"`
	Channel            json.RawMessage `json:"channel"`
	Model              json.RawMessage `json:"model"`
	ResumeToken        json.RawMessage `json:"resumeToken"`
}

// MemberProfile is the hello_ack's view of the member row.
type MemberProfile struct {
	RoleTag     *string `json:"roleTag"`
	Groups      []Group `json:"groups"`
	MessageMode string  `json:"messageMode"`
}

// MeshPolicy carries mesh.self_editable when it is set.
type MeshPolicy struct {
	SelfEditable json.RawMessage `json:"selfEditable"`
}

// ServiceInfo is one entry of hello_ack.services.
type ServiceInfo struct {
	Name        string          `json:"name"`
	Description *string         `json:"description"`
	Status      string          `json:"status"`
	Tools       json.RawMessage `json:"tools"`
	DeployedBy  string          `json:"deployed_by"`
}

// HelloAck answers a successful hello of either kind (01 §4.1). Optional
// keys are omitted, never null. Services is a pointer so that "no table"
// (absent) and "no rows" ([]) stay distinct. LeaseTTLMs and ResumeToken are
// meshbroker's additions (decision H7); old clients ignore them.
type HelloAck struct {
	Type              string          `json:"type"`
	PresenceID        string          `json:"presenceId"`
	MemberDisplayName string          `json:"memberDisplayName"`
	MemberProfile     *MemberProfile  `json:"memberProfile,omitempty"`
	MeshPolicy        *MeshPolicy     `json:"meshPolicy,omitempty"`
	Restored          bool            `json:"restored,omitempty"`
	LastSummary       string          `json:"lastSummary,omitempty"`
	LastSeenAt        string          `json:"lastSeenAt,omitempty"`
	RestoredGroups    []Group         `json:"restoredGroups,omitempty"`
	RestoredStats     json.RawMessage `json:"restoredStats,omitempty"`
	Services          *[]ServiceInfo  `json:"services,omitempty"`
	LeaseTTLMs        int64           `json:"leaseTtlMs"`
	ResumeToken       string          `json:"resumeToken,omitempty"`
}

// SystemPush is a broker-originated event (peer_joined, peer_left, ...),
// never queued (01 §8).
type SystemPush struct {
	Type         string `json:"type"`
	Subtype      string `json:"subtype"`
	Event        string `json:"event"`
	EventData    any    `json:"eventData"`
	MessageID    string `json:"messageId"`
	MeshID       string `json:"meshId"`
	SenderPubkey string `json:"senderPubkey"`
	Priority     string `json:"priority"`
	Nonce        string `json:"nonce"`
	Ciphertext   string `json:"ciphertext"`
	CreatedAt    string `json:"createdAt"`
}

// NewSystemPush fills the fixed parts of a system push.
func NewSystemPush(meshID, event, priority string, data any, now string) SystemPush {
	return SystemPush{
		Type: "push", Subtype: "system", Event: event, EventData: data,
		MessageID: NewUUID(), MeshID: meshID, SenderPubkey: "system",
		Priority: priority, Nonce: "", Ciphertext: "", CreatedAt: now,
	}
}

// PeerEvent is eventData for peer_joined, peer_returned, peer_left,
// peer_visible and peer_hidden. Keys absent in an event are omitted.
type PeerEvent struct {
	Name       string   `json:"name"`
	Pubkey     string   `json:"pubkey"`
	Groups     *[]Group `json:"groups,omitempty"`
	LastSeenAt string   `json:"lastSeenAt,omitempty"`
	Summary    string   `json:"summary,omitempty"`
}
