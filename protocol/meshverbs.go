package protocol

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strconv"
)

// Frames of the mesh verbs the CLI's `info`, `peer bans` and `topic
// members|history|read` send, in the reference's shapes.

// TaskCounts is mesh_info's tasks object.
type TaskCounts struct {
	Open    int `json:"open"`
	Claimed int `json:"claimed"`
	Done    int `json:"done"`
}

// MeshInfoResult answers mesh_info.
type MeshInfoResult struct {
	Type        string     `json:"type"`
	Mesh        string     `json:"mesh"`
	Peers       int        `json:"peers"`
	Groups      []string   `json:"groups"`
	StateKeys   []string   `json:"stateKeys"`
	MemoryCount int        `json:"memoryCount"`
	FileCount   int        `json:"fileCount"`
	Tasks       TaskCounts `json:"tasks"`
	Streams     []string   `json:"streams"`
	Tables      []string   `json:"tables"`
	Collections []string   `json:"collections"`
	YourName    string     `json:"yourName"`
	YourGroups  []Group    `json:"yourGroups"`
	ReqID       string     `json:"_reqId,omitempty"`
}

// BanEntry is one revoked member in list_bans_result.
type BanEntry struct {
	Name      string `json:"name"`
	Pubkey    string `json:"pubkey"`
	RevokedAt string `json:"revokedAt"`
}

// ListBansResult answers list_bans.
type ListBansResult struct {
	Type  string     `json:"type"`
	Bans  []BanEntry `json:"bans"`
	ReqID string     `json:"_reqId,omitempty"`
}

// TopicMemberEntry is one member in topic_members_response.
type TopicMemberEntry struct {
	MemberID    string  `json:"memberId"`
	Pubkey      string  `json:"pubkey"`
	DisplayName string  `json:"displayName"`
	Role        string  `json:"role"`
	JoinedAt    string  `json:"joinedAt"`
	LastReadAt  *string `json:"lastReadAt"`
}

// TopicMembersResponse answers topic_members; Topic echoes the request.
type TopicMembersResponse struct {
	Type    string             `json:"type"`
	Topic   string             `json:"topic"`
	Members []TopicMemberEntry `json:"members"`
	ReqID   string             `json:"_reqId,omitempty"`
}

// TopicHistoryEntry is one stored topic message, newest first.
type TopicHistoryEntry struct {
	ID             string  `json:"id"`
	SenderPubkey   string  `json:"senderPubkey"`
	SenderMemberID string  `json:"senderMemberId"`
	SenderName     string  `json:"senderName"`
	Nonce          string  `json:"nonce"`
	Ciphertext     string  `json:"ciphertext"`
	BodyVersion    int     `json:"bodyVersion"`
	ReplyToID      *string `json:"replyToId,omitempty"`
	CreatedAt      string  `json:"createdAt"`
}

// TopicHistoryResponse answers topic_history.
type TopicHistoryResponse struct {
	Type     string              `json:"type"`
	Topic    string              `json:"topic"`
	Messages []TopicHistoryEntry `json:"messages"`
	ReqID    string              `json:"_reqId,omitempty"`
}

// TopicHistory is the topic_history request.
type TopicHistory struct {
	Topic    json.RawMessage `json:"topic"`
	Limit    json.RawMessage `json:"limit"`
	BeforeID json.RawMessage `json:"beforeId"`
}

// MemberRequestSigningString is what a member signs to call a member HTTP
// route (meshbroker's own proof; headers X-Member-Id,
// X-Claudemesh-Timestamp, X-Claudemesh-Signature). The body enters as the
// hex SHA-256 of its bytes; path is the escaped URL path.
func MemberRequestSigningString(meshID, memberID, method, path string, timestampMs int64, body []byte) string {
	sum := sha256.Sum256(body)
	return "claudemesh-member-api|" + meshID + "|" + memberID + "|" + method + "|" + path + "|" + strconv.FormatInt(timestampMs, 10) + "|" + hex.EncodeToString(sum[:])
}
