package protocol

// Code is the `code` of an error frame and, for handshake rejections, the
// close reason too.
type Code string

// Error codes. The handshake ones double as the 1008 close reason.
const (
	CodeNoHello              Code = "no_hello"
	CodeMalformed            Code = "malformed"
	CodeInvalidArgument      Code = "invalid_argument"
	CodeUnsupported          Code = "unsupported"
	CodeAlreadyAuthenticated Code = "already_authenticated"
	CodeHelloTimeout         Code = "hello_timeout"
	CodeCapacity             Code = "capacity"
	CodeTimestampSkew        Code = "timestamp_skew"
	CodeBadSignature         Code = "bad_signature"
	CodeBadSessionPubkey     Code = "bad_session_pubkey"
	CodeBadParentPubkey      Code = "bad_parent_pubkey"
	CodeAttestationMismatch  Code = "attestation_mismatch"
	CodeExpired              Code = "expired"
	CodeTTLTooLong           Code = "ttl_too_long"
	CodeRevoked              Code = "revoked"
	CodeUnauthorized         Code = "unauthorized"
	CodeParentMismatch       Code = "parent_member_id_mismatch"
	CodeForbidden            Code = "forbidden"
	CodeNotFound             Code = "not_found"
	CodeInvalid              Code = "invalid"
	CodeAmbiguousPrefix      Code = "ambiguous_prefix"
	CodeTopicNotFound        Code = "topic_not_found"
	CodeInternal             Code = "internal"
	CodeAuditQueryError      Code = "audit_query_error"
	CodeAuditVerifyError     Code = "audit_verify_error"
	CodeHelloReplayed        Code = "hello_replayed"       // a signed hello already used inside the skew window (H10)
	CodeSessionPubkeyTaken   Code = "session_pubkey_taken" // a member hello's label is another member's key (H3)
)

// Close is a WebSocket close: a code and a reason of at most 123 bytes.
// Retry says whether well-behaved clients reconnect after it.
type Close struct {
	Code   int
	Reason string
	Retry  bool
}

// The close table. Protocol codes first; 4000-4999 (RFC 6455 private range)
// where the protocol is silent. 1006 never goes on the wire: a terminated
// socket (stale pong) has no close frame and the peer reports 1006.
var (
	CloseSessionReplaced  = Close{1000, "session_replaced", true}
	CloseDisconnected     = Close{1000, "disconnected", true}
	CloseDisconnectStale  = Close{1000, "disconnected_stale", true}
	CloseShuttingDown     = Close{1001, "shutting down", true}
	CloseTooBig           = Close{1009, "message too big", true}
	CloseKicked           = Close{4001, "kicked", false}
	CloseKickedStale      = Close{4001, "kicked_stale", false}
	CloseBanned           = Close{4002, "banned", false}
	CloseSlowConsumer     = Close{4008, "slow_consumer", true} // ours: the outbound queue overflowed; queued DMs drain on reattach
	CloseHelloRejectedTag = 1008                               // handshake rejections: reason = the error code
)

// HandshakeClose is the close that follows a rejected hello: 1008 with the
// code as reason, except revocation, which is terminal 4002 "banned".
func HandshakeClose(c Code) Close {
	if c == CodeRevoked {
		return CloseBanned
	}
	return Close{CloseHelloRejectedTag, string(c), true}
}
