package protocol

import "encoding/json"

// Frames of the audit log (04 §1.7, §1.8). audit_verify has no fields
// beyond the Head.

// AuditQuery is `{"type":"audit_query","limit"?,"offset"?,"eventType"?}`.
// The fields stay raw so the edge can tell absent from wrong-typed and
// answer audit_query_error for a negative or fractional number.
type AuditQuery struct {
	Limit     json.RawMessage `json:"limit"`
	Offset    json.RawMessage `json:"offset"`
	EventType json.RawMessage `json:"eventType"`
}

// AuditEntry is one row of audit_result. Actor is actor_display_name, else
// actor_member_id, else "system"; prev_hash is not sent.
type AuditEntry struct {
	ID        int64           `json:"id"`
	EventType string          `json:"eventType"`
	Actor     string          `json:"actor"`
	Payload   json.RawMessage `json:"payload"`
	Hash      string          `json:"hash"`
	CreatedAt string          `json:"createdAt"` // ISO
}

// AuditResult answers audit_query: newest first; Total counts every row
// matching the mesh and event type, ignoring limit and offset.
type AuditResult struct {
	Type    string       `json:"type"` // "audit_result"
	Entries []AuditEntry `json:"entries"`
	Total   int64        `json:"total"`
	ReqID   string       `json:"_reqId,omitempty"`
}

// AuditVerifyResult answers audit_verify. Entries counts all of the mesh's
// rows, also when the chain is broken; BrokenAt is the id of the first bad
// row and is present only when Valid is false.
type AuditVerifyResult struct {
	Type     string `json:"type"` // "audit_verify_result"
	Valid    bool   `json:"valid"`
	Entries  int64  `json:"entries"`
	BrokenAt *int64 `json:"brokenAt,omitempty"`
	ReqID    string `json:"_reqId,omitempty"`
}
