package client

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/gorilla/websocket"

	"github.com/claudemesh/meshbroker/protocol"
)

// Identity is a member's identity in one mesh.
type Identity struct {
	MeshID      string
	MemberID    string
	DisplayName string
	Key         ed25519.PrivateKey
}

// Pubkey is the member's public key in lowercase hex.
func (i Identity) Pubkey() string { return protocol.PubkeyHex(i.Key) }

// Session is an ephemeral session key vouched for by the member.
type Session struct {
	Key       ed25519.PrivateKey
	ExpiresAt time.Time // attestation expiry; zero means 12 h after each hello
}

// Pubkey is the session public key in lowercase hex.
func (s Session) Pubkey() string { return protocol.PubkeyHex(s.Key) }

// NewSession makes a fresh session key.
func NewSession() Session {
	_, k, _ := ed25519.GenerateKey(nil)
	return Session{Key: k}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (o Options) now() time.Time {
	if o.Now != nil {
		return o.Now()
	}
	return time.Now()
}

// BuildHello returns the signed hello frame Connect would send first, for
// callers that speak the protocol over their own socket (see Dial). With an
// empty opts.SessionID the frame gets a random one.
func BuildHello(id Identity, opts Options) map[string]any {
	if opts.SessionID == "" {
		opts.SessionID = "go-" + randomHex(6)
	}
	return helloFrame(id, opts, opts.ResumeToken)
}

// helloFrame builds and signs a hello (member, or session with
// opts.Session) at the current time of opts.Now, then applies the test
// hooks. opts.SessionID must be set.
func helloFrame(id Identity, o Options, resumeToken string) map[string]any {
	ts := float64(o.now().UnixMilli())
	var f map[string]any
	if o.Session != nil {
		exp := o.Session.ExpiresAt
		if exp.IsZero() {
			exp = o.now().Add(12 * time.Hour)
		}
		expMs := float64(exp.UnixMilli())
		parent := id.Pubkey()
		sp := o.Session.Pubkey()
		f = map[string]any{
			"type": "session_hello", "meshId": id.MeshID, "parentMemberId": id.MemberID, "parentMemberPubkey": parent,
			"sessionPubkey": sp, "sessionId": o.SessionID, "pid": o.Pid, "cwd": o.Cwd, "timestamp": ts,
			"parentAttestation": map[string]any{
				"sessionPubkey": sp, "parentMemberPubkey": parent, "expiresAt": expMs,
				"signature": protocol.Sign(id.Key, protocol.SessionAttestString(parent, sp, expMs)),
			},
			"signature": protocol.Sign(o.Session.Key, protocol.SessionHelloString(id.MeshID, parent, sp, ts)),
		}
	} else {
		f = map[string]any{
			"type": "hello", "meshId": id.MeshID, "memberId": id.MemberID, "pubkey": id.Pubkey(), "timestamp": ts,
			"sessionId": o.SessionID, "pid": o.Pid, "cwd": o.Cwd,
			"signature": protocol.Sign(id.Key, protocol.HelloSigningString(id.MeshID, id.MemberID, id.Pubkey(), ts)),
		}
		if o.SessionPubkey != "" {
			f["sessionPubkey"] = o.SessionPubkey
		}
	}
	if o.DisplayName != "" {
		f["displayName"] = o.DisplayName
	}
	if o.Groups != nil {
		f["groups"] = o.Groups
	}
	if resumeToken != "" {
		f["resumeToken"] = resumeToken
	}
	if h := o.hooks; h != nil {
		for k, v := range h.Extra {
			f[k] = v
		}
		for _, k := range h.Omit {
			delete(f, k)
		}
		if h.Mutate != nil {
			h.Mutate(f)
		}
	}
	return f
}

// Dial opens a raw WebSocket to url (ws://host:port/ws) with extra upgrade
// headers, for callers that speak the protocol themselves (BuildHello gives
// them a signed hello). Connect is the usual way in.
func Dial(ctx context.Context, url string, header http.Header) (*websocket.Conn, error) {
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	ws, resp, err := d.DialContext(ctx, url, header)
	if err != nil {
		if resp != nil {
			resp.Body.Close()
		}
		return nil, fmt.Errorf("dial %s: %w", url, err)
	}
	return ws, nil
}

// handshakeResult is what a successful hello yields.
type handshakeResult struct {
	ack   protocol.HelloAck
	raw   json.RawMessage
	early []Frame // frames the broker sent before hello_ack (it should not, H5)
}

// handshake sends hello on a fresh socket and reads it synchronously until
// hello_ack or a rejection; nothing else reads ws yet. The read is bounded
// by timeout and by ctx.
func handshake(ctx context.Context, ws *websocket.Conn, hello map[string]any, timeout time.Duration) (handshakeResult, error) {
	var res handshakeResult
	b, err := json.Marshal(hello)
	if err != nil {
		return res, fmt.Errorf("encode hello: %w", err)
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = ws.SetWriteDeadline(deadline)
	if err := ws.WriteMessage(websocket.TextMessage, b); err != nil {
		return res, fmt.Errorf("send hello: %w", err)
	}
	_ = ws.SetReadDeadline(deadline)
	// A cancelled ctx unblocks the read by moving the deadline to now.
	stop := context.AfterFunc(ctx, func() { _ = ws.NetConn().SetReadDeadline(time.Now()) })
	defer stop()
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				return res, &HandshakeError{Code: ce.Text, Message: "closed before hello_ack", Close: ce}
			}
			if ctx.Err() != nil {
				return res, fmt.Errorf("wait for hello_ack: %w", ctx.Err())
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return res, fmt.Errorf("wait for hello_ack: %w", context.DeadlineExceeded)
			}
			return res, fmt.Errorf("wait for hello_ack: %w", err)
		}
		var h head
		_ = json.Unmarshal(data, &h)
		f := Frame{Type: h.Type, Raw: json.RawMessage(data)}
		switch h.Type {
		case "hello_ack":
			res.raw = f.Raw
			if err := f.Decode(&res.ack); err != nil {
				return res, fmt.Errorf("decode hello_ack: %w", err)
			}
			if !stop() { // ctx ended just now and may have moved the deadline: give up
				return res, fmt.Errorf("wait for hello_ack: %w", ctx.Err())
			}
			_ = ws.SetReadDeadline(time.Time{})
			_ = ws.SetWriteDeadline(time.Time{})
			return res, nil
		case "error":
			var e protocol.ErrorFrame
			_ = f.Decode(&e)
			he := &HandshakeError{Code: string(e.Code), Message: e.Message}
			// The close frame follows the error frame; wait a little for it.
			_ = ws.SetReadDeadline(time.Now().Add(2 * time.Second))
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					errors.As(err, &he.Close)
					break
				}
			}
			return res, he
		}
		res.early = append(res.early, f)
	}
}
