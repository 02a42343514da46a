package handlers

import (
	"io"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/claudemesh/meshbroker/protocol"
)

func TestPushMessageID(t *testing.T) {
	for _, tt := range []struct {
		frame string
		id    string
		ok    bool
	}{
		{string(protocol.MustEncode(protocol.Push{Type: "push", MessageID: "abc123", MeshID: "m"})), "abc123", true},
		{string(protocol.MustEncode(protocol.MulticastPush{Type: "push", MessageID: "xyz"})), "xyz", true},
		{string(protocol.MustEncode(protocol.NewSystemPush("m", "peer_joined", "low", nil, "t"))), "", false},
		{`{"type":"ack","id":"x"}`, "", false},
		{`{"type":"push","messageId":"unterminated`, "", false},
	} {
		id, ok := pushMessageID(protocol.Frame(tt.frame))
		if id != tt.id || ok != tt.ok {
			t.Errorf("%s → %q %v", tt.frame, id, ok)
		}
	}
}

// A normal close frame read after the socket began closing counts as the
// client's only when that close began with a failed write: a one-shot CLI
// command sends a request and closes at once, and the reply's write can fail
// before the reader reaches the close frame already on the wire. Counting it
// as a drop gave the session the full offline lease (a ghost peer for 90 s).
// A close the broker chose (kick, shutdown, session_replaced) echoed back by
// the client never counts.
func TestClientClosedNormallyAfterFailedWrite(t *testing.T) {
	normal := &websocket.CloseError{Code: websocket.CloseNoStatusReceived}
	for _, tt := range []struct {
		name  string
		close func(w *wsConn)
		err   error
		want  bool
	}{
		{"open socket, normal close", func(*wsConn) {}, normal, true},
		{"open socket, 1001", func(*wsConn) {}, &websocket.CloseError{Code: websocket.CloseGoingAway}, true},
		{"open socket, protocol error code", func(*wsConn) {}, &websocket.CloseError{Code: websocket.CloseProtocolError}, false},
		{"open socket, no close frame", func(*wsConn) {}, io.ErrUnexpectedEOF, false},
		{"after a failed write", func(w *wsConn) { w.shutdown(protocol.Close{}, true, true) }, normal, true},
		{"after a failed write, no close frame", func(w *wsConn) { w.shutdown(protocol.Close{}, true, true) }, io.ErrUnexpectedEOF, false},
		{"after the broker's close", func(w *wsConn) { w.shutdown(protocol.Close{Code: 4001, Reason: "kicked"}, false, false) }, normal, false},
		{"after the broker's terminate", func(w *wsConn) { w.shutdown(protocol.Close{}, true, false) }, normal, false},
		{"failed write after the broker's close", func(w *wsConn) {
			w.shutdown(protocol.Close{Code: 1001}, false, false)
			w.shutdown(protocol.Close{}, true, true) // the first cause stays
		}, normal, false},
	} {
		// writerExited: no writer goroutine is started on this bare socket.
		w := &wsConn{closing: make(chan struct{}), writerExited: true}
		tt.close(w)
		if got := w.clientClosedNormally(tt.err); got != tt.want {
			t.Errorf("%s: clientClosedNormally = %v, want %v", tt.name, got, tt.want)
		}
	}
}
