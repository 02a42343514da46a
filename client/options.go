package client

import (
	"net/http"
	"time"

	"github.com/claudemesh/meshbroker/internal/clienthooks"
	"github.com/claudemesh/meshbroker/protocol"
)

// Options tune a connection. The zero value connects once with a member
// hello, auto-acks received messages and does not reconnect.
type Options struct {
	// Session makes the client connect with a session_hello for this
	// ephemeral key (vouched for by the member key) instead of a member
	// hello. Senders then see the session key as senderPubkey, DMs to it
	// reach only this connection, and the lease can be resumed.
	Session *Session
	// SessionID is hello.sessionId; empty: "go-<random>", chosen once and
	// kept across reconnects.
	SessionID string
	// SessionPubkey is a member hello's routing label (not signed, and
	// ignored with Session set).
	SessionPubkey string
	DisplayName   string           // hello.displayName
	Pid           int              // hello.pid
	Cwd           string           // hello.cwd
	Groups        []protocol.Group // hello.groups
	// ResumeToken is a token from an earlier hello_ack of the same identity,
	// sent with the first hello to take the lease back (01 §11). The client
	// replaces it with each hello_ack's token when it reconnects.
	ResumeToken string

	// HelloTimeout bounds each handshake; default 10 s.
	HelloTimeout time.Duration
	// Header holds extra HTTP headers for the WebSocket upgrade.
	Header http.Header
	// EventBuffer is how many inbound frames are buffered before the reader
	// stops reading (and the broker's outbound queue fills); default 4096.
	EventBuffer int
	// Now is the clock hellos are signed with; default time.Now.
	Now func() time.Time

	// ManualAck turns off the client_ack that Receive sends for every
	// direct message it returns; call Client.Ack when the message is safe.
	ManualAck bool
	// Reconnect, when set, makes the client redial after losing its socket
	// and resume its lease; see ReconnectPolicy. Nil: a lost socket ends
	// the Client.
	Reconnect *ReconnectPolicy

	hooks *clienthooks.Hooks // test-only knobs, see internal/clienttest
}

// ReconnectPolicy is the backoff of automatic reconnection, which starts
// after the first socket is lost: Connect itself does not retry, its dial
// and hello must succeed. Delays grow from MinDelay, doubling per failed
// attempt up to MaxDelay, each with random jitter (between half and the
// whole of the step), so a broker restart does not bring every client back
// in the same instant.
type ReconnectPolicy struct {
	MinDelay time.Duration // first delay; default 500 ms
	MaxDelay time.Duration // largest delay; default 30 s
	// MaxAttempts is how many failed dials or hellos in a row end the
	// Client; 0 means keep trying until Close.
	MaxAttempts int
	// OnReconnect, when set, is called (from the client's own goroutine,
	// so it must not block for long) after each successful reconnect with
	// that hello's ack. ack.PresenceID equal to the first one means the
	// lease was resumed: peers saw no peer_left and no peer_joined.
	OnReconnect func(ack protocol.HelloAck)
	// OnDisconnect, when set, is called with the error that ended a socket
	// before the client starts redialling.
	OnDisconnect func(err error)
}

func (p ReconnectPolicy) bounds() (lo, hi time.Duration) {
	lo, hi = p.MinDelay, p.MaxDelay
	if lo <= 0 {
		lo = 500 * time.Millisecond
	}
	if hi <= 0 {
		hi = 30 * time.Second
	}
	if hi < lo {
		hi = lo
	}
	return lo, hi
}

func init() {
	clienthooks.Attach = func(opts any, edit func(*clienthooks.Hooks)) any {
		o := opts.(Options)
		var h clienthooks.Hooks
		if o.hooks != nil {
			h = *o.hooks
		}
		edit(&h)
		o.hooks = &h
		return o
	}
}
