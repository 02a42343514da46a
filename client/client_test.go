package client

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/internal/clienthooks"
	"github.com/claudemesh/meshbroker/protocol"
)

// The broker's texts for signature and timestamp failures already say
// "hello rejected: <code>"; the error says it once.
func TestHandshakeErrorText(t *testing.T) {
	for _, tt := range []struct{ code, msg, want string }{
		{"bad_signature", "hello rejected: bad_signature", "hello rejected: bad_signature"},
		{"bad_signature", "session_hello rejected: bad_signature", "session_hello rejected: bad_signature"},
		{"expired", "attestation rejected: expired", "attestation rejected: expired"},
		{"revoked", `You've been removed from "m".`, `hello rejected: revoked: You've been removed from "m".`},
		{"bad_session_pubkey", "sessionPubkey must be 64 lowercase hex chars", "hello rejected: bad_session_pubkey: sessionPubkey must be 64 lowercase hex chars"},
		{"banned", "closed before hello_ack", "hello rejected: banned: closed before hello_ack"},
		{"capacity", "", "hello rejected: capacity"},
	} {
		if got := (&HandshakeError{Code: tt.code, Message: tt.msg}).Error(); got != tt.want {
			t.Errorf("%s/%q: %q, want %q", tt.code, tt.msg, got, tt.want)
		}
	}
}

// Every refusal text of 02 §1.4, §1.5, §2.4 and §5.7 maps to its code.
func TestSendErrorFromAck(t *testing.T) {
	for _, tt := range []struct {
		text, code string
		temporary  bool
	}{
		{"rate_limit: max 60 msg/min (burst 10) — slow down", SendRateLimited, true},
		{"payload too large: 70000 bytes > MAX_MESSAGE_BYTES=65536", SendTooLarge, false},
		{"no connected peer for target (not online, or targetSpec is your own key without another session)", SendNoRecipient, true},
		{"no connected peer for target (ambiguous display name)", SendNoRecipient, true},
		{"blocked by recipient grants (sender lacks dm capability)", SendBlocked, false},
		{"invalid_argument: priority must be one of now, next, low", SendInvalid, false},
		{"not_found: topic abc", SendNotFound, false},
		{"invalid: client_message_id reused with a different request_fingerprint", SendConflict, false},
		{"Something new: went wrong", SendRejected, false},
	} {
		e := sendErrorFromAck("s1", tt.text)
		if e.Code != tt.code || e.Message != tt.text || e.ID != "s1" || e.Temporary() != tt.temporary {
			t.Errorf("%q: %+v temporary %v", tt.text, e, e.Temporary())
		}
		var se *SendError
		if err := error(e); !errors.As(fmt.Errorf("wrapped: %w", err), &se) || se != e {
			t.Errorf("%q: errors.As fails", tt.text)
		}
	}
	if got := (&SendError{Code: SendNoRecipient, Message: "no connected peer for target"}).Error(); got != "send rejected: no_recipient: no connected peer for target" {
		t.Errorf("text %q", got)
	}
	if got := (&SendError{Code: SendRateLimited, Message: "rate_limit: slow down"}).Error(); got != "send rejected: rate_limit: slow down" {
		t.Errorf("text %q", got)
	}
}

func TestPriority(t *testing.T) {
	for p, ok := range map[Priority]bool{PriorityNow: true, PriorityNext: true, PriorityLow: true, "": false, "urgent": false, "NOW": false} {
		if p.Valid() != ok {
			t.Errorf("%q.Valid() = %v", p, !ok)
		}
	}
	b, _ := json.Marshal(SendRequest{Priority: PriorityLow}.Priority)
	if string(b) != `"low"` {
		t.Fatalf("wire %s", b)
	}
}

func TestBackoff(t *testing.T) {
	lo, hi := ReconnectPolicy{}.bounds()
	if lo != 500*time.Millisecond || hi != 30*time.Second {
		t.Fatalf("defaults %v %v", lo, hi)
	}
	if lo, hi := (ReconnectPolicy{MinDelay: time.Second, MaxDelay: time.Millisecond}).bounds(); hi != lo {
		t.Fatalf("max below min: %v %v", lo, hi)
	}
	for range 1000 {
		if d := jitter(100 * time.Millisecond); d < 50*time.Millisecond || d > 100*time.Millisecond {
			t.Fatalf("jitter %v outside [50ms, 100ms]", d)
		}
	}
}

func TestRecvStateForgetsOldest(t *testing.T) {
	var r recvState
	if !r.firstTime("a") || r.firstTime("a") {
		t.Fatal("a seen twice or never")
	}
	for i := range recvRemember {
		r.firstTime(fmt.Sprint(i))
	}
	if !r.firstTime("a") {
		t.Fatal("the oldest id was not forgotten")
	}
	if r.firstTime(fmt.Sprint(recvRemember - 1)) {
		t.Fatal("a recent id was forgotten")
	}
	if len(r.seen) != recvRemember || len(r.ring) != recvRemember {
		t.Fatalf("grew to %d/%d", len(r.seen), len(r.ring))
	}
}

// open tries the session key, then the member key; multicast bodies are
// base64; a bad sender key or a foreign envelope is ErrUnreadable.
func TestOpenPush(t *testing.T) {
	_, member, _ := ed25519.GenerateKey(nil)
	sess := NewSession()
	_, senderKey, _ := ed25519.GenerateKey(nil)
	_, stranger, _ := ed25519.GenerateKey(nil)
	sender := protocol.PubkeyHex(senderKey)
	c := &Client{ID: Identity{Key: member}, Opts: Options{Session: &sess}}
	seal := func(to ed25519.PrivateKey, body string) pushFrame {
		n, ct, err := Seal([]byte(body), to.Public().(ed25519.PublicKey), senderKey)
		if err != nil {
			t.Fatal(err)
		}
		return pushFrame{MessageID: "m1", SenderPubkey: sender, Priority: "now", Nonce: n, Ciphertext: ct, CreatedAt: "2026-05-05T11:31:55.123Z"}
	}
	for _, tt := range []struct {
		name      string
		to        ed25519.PrivateKey
		recipient string
	}{{"to the session", sess.Key, sess.Pubkey()}, {"to the member", member, protocol.PubkeyHex(member)}} {
		m, err := c.open(seal(tt.to, tt.name), nil)
		if err != nil || string(m.Plaintext) != tt.name || m.Recipient != tt.recipient || !m.Direct || m.Priority != PriorityNow ||
			!bytes.Equal(m.Sender, senderKey.Public().(ed25519.PublicKey)) || m.CreatedAt != time.Date(2026, 5, 5, 11, 31, 55, 123e6, time.UTC) {
			t.Fatalf("%s: %+v %v", tt.name, m, err)
		}
	}
	if m, err := c.open(seal(stranger, "not for us"), nil); !errors.Is(err, ErrUnreadable) || m.Plaintext != nil || m.ID != "m1" {
		t.Fatalf("foreign envelope: %+v %v", m, err)
	}
	memberOnly := &Client{ID: Identity{Key: member}}
	if _, err := memberOnly.open(seal(sess.Key, "x"), nil); !errors.Is(err, ErrUnreadable) {
		t.Fatalf("a member connection opened a session envelope: %v", err)
	}
	bad := seal(member, "x")
	bad.SenderPubkey = "ABC"
	if _, err := c.open(bad, nil); !errors.Is(err, ErrUnreadable) {
		t.Fatalf("bad sender: %v", err)
	}
	mc := pushFrame{MessageID: "m2", SenderPubkey: sender, SenderMemberPubkey: protocol.PubkeyHex(stranger), SenderName: "s",
		Priority: "next", Nonce: "bm9uY2U=", Ciphertext: base64.StdEncoding.EncodeToString([]byte("to all")), Topic: "ops"}
	if m, err := c.open(mc, nil); err != nil || m.Direct || string(m.Plaintext) != "to all" || m.Recipient != "" || m.Topic != "ops" ||
		!bytes.Equal(m.SenderMember, stranger.Public().(ed25519.PublicKey)) {
		t.Fatalf("multicast %+v %v", m, err)
	}
	mc.Ciphertext = "%%%"
	if _, err := c.open(mc, nil); !errors.Is(err, ErrUnreadable) {
		t.Fatalf("multicast not base64: %v", err)
	}
}

// The hooks attached through internal/clienthooks reach the hello after
// it is signed, compose, and leave the caller's Options alone.
func TestHelloHooks(t *testing.T) {
	_, k, _ := ed25519.GenerateKey(nil)
	id := Identity{MeshID: "m", MemberID: "x", Key: k}
	fixed := func() time.Time { return time.UnixMilli(1_700_000_000_000) }
	opts := Options{SessionID: "s", Cwd: "/c", ResumeToken: "tok", Now: fixed}
	plain := BuildHello(id, opts)
	if plain["resumeToken"] != "tok" || plain["cwd"] != "/c" || plain["sessionId"] != "s" {
		t.Fatalf("hello %v", plain)
	}
	o := clienthooks.Attach(opts, func(h *clienthooks.Hooks) { h.Omit = []string{"cwd"} }).(Options)
	o = clienthooks.Attach(o, func(h *clienthooks.Hooks) {
		h.Extra = map[string]any{"sessionPubkey": 5}
		h.Mutate = func(m map[string]any) { m["pid"] = 7 }
	}).(Options)
	got := BuildHello(id, o)
	if _, has := got["cwd"]; has || got["pid"] != 7 || got["sessionPubkey"] != 5 || got["signature"] != plain["signature"] {
		t.Fatalf("hooked hello %v", got)
	}
	if opts.hooks != nil || o.hooks.Omit[0] != "cwd" {
		t.Fatal("attaching hooks changed the original options or lost the first hook")
	}
}
