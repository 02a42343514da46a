package client

import (
	"errors"
	"strings"

	"github.com/gorilla/websocket"

	"github.com/claudemesh/meshbroker/protocol"
)

// Errors a Client returns. Test with errors.Is / errors.As.
var (
	// ErrConnectionLost fails every request and send still waiting for its
	// answer when the socket goes (with or without Options.Reconnect). The
	// frame may or may not have reached the broker: an idempotent retry
	// (same SendRequest.ClientMessageID) is safe.
	ErrConnectionLost = errors.New("client: connection lost")
	// ErrNotConnected is returned by writes while a reconnecting client has
	// no socket.
	ErrNotConnected = errors.New("client: not connected (reconnecting)")
	// ErrClosed is Err after Close or Kill.
	ErrClosed = errors.New("client: closed")
)

// HandshakeError is the broker's rejection of a hello: the error frame's
// code and message, and the close that followed.
type HandshakeError struct {
	Code, Message string
	Close         *websocket.CloseError
}

// Error names the code once: the broker's texts for signature and
// timestamp failures already read "hello rejected: <code>", and repeating
// the prefix and code around them said everything twice.
func (e *HandshakeError) Error() string {
	switch {
	case e.Message == "":
		return "hello rejected: " + e.Code
	case strings.Contains(e.Message, "rejected: "+e.Code):
		return e.Message
	default:
		return "hello rejected: " + e.Code + ": " + e.Message
	}
}

// retryable reports whether a reconnecting client should try again after
// this rejection: a full mesh, a slow hello, a broker error, or a hello
// signed in the same millisecond as another (hello_replayed). Anything
// else (revoked, unknown key, bad signature, ...) will not change by
// waiting.
func (e *HandshakeError) retryable() bool {
	switch e.Code {
	case string(protocol.CodeCapacity), string(protocol.CodeHelloTimeout), string(protocol.CodeInternal), string(protocol.CodeHelloReplayed), protocol.CloseShuttingDown.Reason:
		return true
	}
	return false
}

// Send rejection codes (SendError.Code). The broker answers a refused send
// with an ack carrying queued:false and a fixed text (02 §1.4); the client
// maps the texts to these codes. Error frames answering a send keep their
// own code (e.g. "internal" for a row that could not be stored).
const (
	SendRateLimited = "rate_limit"        // the member's token bucket is empty; retry later
	SendTooLarge    = "too_large"         // nonce+ciphertext+targetSpec above MAX_MESSAGE_BYTES
	SendNoRecipient = "no_recipient"      // no live or leased connection holds the target key or name
	SendBlocked     = "blocked_by_grants" // every candidate's peer_grants deny the sender dm
	SendInvalid     = "invalid_argument"  // a malformed send frame
	SendNotFound    = "not_found"         // #topicId is not a topic of this mesh
	SendConflict    = "invalid"           // client_message_id reused with a different request_fingerprint
	SendInternal    = "internal"          // the broker could not store the row; retry
	SendRejected    = "rejected"          // a refusal text this client does not know
)

// SendError is a send the broker refused: Send returns it (with the ack,
// for callers that read ack.Error) instead of a nil error.
type SendError struct {
	ID      string // the send's correlation id
	Code    string // one of the Send* codes
	Message string // the broker's text, byte for byte
}

func (e *SendError) Error() string {
	if strings.HasPrefix(e.Message, e.Code) {
		return "send rejected: " + e.Message
	}
	return "send rejected: " + e.Code + ": " + e.Message
}

// Temporary reports whether the same send may succeed later unchanged:
// rate limits, a recipient not (yet) connected, a storage failure.
func (e *SendError) Temporary() bool {
	return e.Code == SendRateLimited || e.Code == SendNoRecipient || e.Code == SendInternal
}

// sendErrorFromAck classifies an ack's error text (02 §1.4, §1.5, §2.4).
func sendErrorFromAck(id, text string) *SendError {
	code := SendRejected
	if i := strings.IndexByte(text, ':'); i > 0 && isCodeWord(text[:i]) {
		code = text[:i] // "rate_limit: ...", "invalid_argument: ...", "not_found: ...", "invalid: ..."
	}
	switch {
	case strings.HasPrefix(text, "payload too large"):
		code = SendTooLarge
	case strings.HasPrefix(text, "no connected peer"):
		code = SendNoRecipient
	case strings.HasPrefix(text, "blocked by recipient grants"):
		code = SendBlocked
	}
	return &SendError{ID: id, Code: code, Message: text}
}

// isCodeWord reports whether s looks like a machine code: lowercase
// letters and underscores.
func isCodeWord(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c == '_') {
			return false
		}
	}
	return s != ""
}

// ErrorReply is an error frame answering a request.
type ErrorReply struct{ Code, Message string }

func (e *ErrorReply) Error() string { return e.Code + ": " + e.Message }
