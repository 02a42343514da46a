package handlers

import (
	"testing"

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
