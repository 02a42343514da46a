// Package client is a Go client for the claudemesh broker protocol: member
// and session hellos, typed events, request/response by _reqId, sends
// correlated by id, and real crypto_box envelopes. The end-to-end tests, the
// load tool and Go users share it.
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
	"strconv"
	"sync"
	"sync/atomic"
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
	ExpiresAt time.Time // attestation expiry; zero means 12 h from now
}

// Pubkey is the session public key in lowercase hex.
func (s Session) Pubkey() string { return protocol.PubkeyHex(s.Key) }

// NewSession makes a fresh session key.
func NewSession() Session {
	_, k, _ := ed25519.GenerateKey(nil)
	return Session{Key: k}
}

// Options tune a connection. Zero values are sensible.
type Options struct {
	Session       *Session             // connect with session_hello instead of hello
	SessionID     string               // hello.sessionId; empty: "go-<random>"
	SessionPubkey string               // member hello's routing label (not signed)
	DisplayName   string               // hello.displayName
	Pid           int                  // hello.pid
	Cwd           string               // hello.cwd
	Groups        []protocol.Group     // hello.groups
	Extra         map[string]any       // extra hello fields (tests: resumeToken, overrides)
	Omit          []string             // hello fields to leave out (tests: the SDK sends no cwd)
	HelloTimeout  time.Duration        // default 10 s
	NoPong        bool                 // do not answer pings (tests: a stalled client)
	Header        http.Header          // extra upgrade headers
	EventBuffer   int                  // inbound events buffered before the reader blocks; default 4096
	Now           func() time.Time     // clock for signatures; default time.Now
	Mutate        func(map[string]any) // last-minute edit of the hello frame (tests)
}

// Frame is one inbound frame: its type and raw JSON.
type Frame struct {
	Type string
	Raw  json.RawMessage
}

// Decode unmarshals the frame into v.
func (f Frame) Decode(v any) error { return json.Unmarshal(f.Raw, v) }

// Client is one WebSocket connection to a broker.
//
// Concurrency: the reader goroutine owns ws reads and delivers frames to
// Events or to pending request waiters (guarded by mu); writes are
// serialized by writeMu. All methods are safe for concurrent use.
type Client struct {
	ID       Identity
	Opts     Options
	HelloAck protocol.HelloAck
	AckRaw   json.RawMessage

	ws      *websocket.Conn
	writeMu sync.Mutex
	events  chan Frame
	done    chan struct{}
	err     atomic.Value // error that ended the reader
	closeCE atomic.Pointer[websocket.CloseError]

	mu      sync.Mutex
	pending map[string]chan Frame // _reqId or send id -> waiter
	nextID  atomic.Uint64
}

// HandshakeError is the broker's rejection of a hello.
type HandshakeError struct {
	Code, Message string
	Close         *websocket.CloseError
}

func (e *HandshakeError) Error() string { return "hello rejected: " + e.Code + ": " + e.Message }

// Connect dials url (ws://host:port/ws), sends the hello and waits for
// hello_ack.
func Connect(ctx context.Context, url string, id Identity, opts Options) (*Client, error) {
	ws, err := Dial(ctx, url, opts.Header)
	if err != nil {
		return nil, err
	}
	c := newClient(ws, id, opts)
	hello := c.helloFrame()
	if err := c.WriteJSON(hello); err != nil {
		ws.Close()
		return nil, fmt.Errorf("send hello: %w", err)
	}
	timeout := opts.HelloTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	tctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		f, err := c.Next(tctx)
		if err != nil {
			c.Kill()
			if ce := c.CloseError(); ce != nil {
				return nil, &HandshakeError{Code: ce.Text, Message: "closed before hello_ack", Close: ce}
			}
			return nil, fmt.Errorf("wait for hello_ack: %w", err)
		}
		switch f.Type {
		case "hello_ack":
			c.AckRaw = f.Raw
			_ = f.Decode(&c.HelloAck)
			return c, nil
		case "error":
			var e protocol.ErrorFrame
			_ = f.Decode(&e)
			he := &HandshakeError{Code: string(e.Code), Message: e.Message}
			select {
			case <-c.done:
			case <-time.After(2 * time.Second):
			}
			he.Close = c.CloseError()
			c.Kill()
			return nil, he
		}
		// Anything before the ack would violate H5; hand it back to the caller.
		c.requeue(f)
	}
}

// Dial opens a raw WebSocket (tests use it to speak bad protocol).
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

func newClient(ws *websocket.Conn, id Identity, opts Options) *Client {
	buf := opts.EventBuffer
	if buf == 0 {
		buf = 4096
	}
	c := &Client{ID: id, Opts: opts, ws: ws, events: make(chan Frame, buf), done: make(chan struct{}), pending: map[string]chan Frame{}}
	if opts.NoPong {
		ws.SetPingHandler(func(string) error { return nil })
	}
	go c.readLoop()
	return c
}

func (c *Client) now() time.Time {
	if c.Opts.Now != nil {
		return c.Opts.Now()
	}
	return time.Now()
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// BuildHello returns the signed hello frame Connect would send, for callers
// that speak the protocol over a raw socket.
func BuildHello(id Identity, opts Options) map[string]any {
	c := &Client{ID: id, Opts: opts}
	return c.helloFrame()
}

func (c *Client) helloFrame() map[string]any {
	o := c.Opts
	ts := float64(c.now().UnixMilli())
	sid := o.SessionID
	if sid == "" {
		sid = "go-" + randomHex(6)
		c.Opts.SessionID = sid
	}
	var f map[string]any
	if o.Session != nil {
		exp := o.Session.ExpiresAt
		if exp.IsZero() {
			exp = c.now().Add(12 * time.Hour)
		}
		expMs := float64(exp.UnixMilli())
		parent := c.ID.Pubkey()
		sp := o.Session.Pubkey()
		f = map[string]any{
			"type": "session_hello", "meshId": c.ID.MeshID, "parentMemberId": c.ID.MemberID, "parentMemberPubkey": parent,
			"sessionPubkey": sp, "sessionId": sid, "pid": o.Pid, "cwd": o.Cwd, "timestamp": ts,
			"parentAttestation": map[string]any{
				"sessionPubkey": sp, "parentMemberPubkey": parent, "expiresAt": expMs,
				"signature": protocol.Sign(c.ID.Key, protocol.SessionAttestString(parent, sp, expMs)),
			},
			"signature": protocol.Sign(o.Session.Key, protocol.SessionHelloString(c.ID.MeshID, parent, sp, ts)),
		}
	} else {
		f = map[string]any{
			"type": "hello", "meshId": c.ID.MeshID, "memberId": c.ID.MemberID, "pubkey": c.ID.Pubkey(), "timestamp": ts,
			"sessionId": sid, "pid": o.Pid, "cwd": o.Cwd,
			"signature": protocol.Sign(c.ID.Key, protocol.HelloSigningString(c.ID.MeshID, c.ID.MemberID, c.ID.Pubkey(), ts)),
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
	for k, v := range o.Extra {
		f[k] = v
	}
	for _, k := range o.Omit {
		delete(f, k)
	}
	if o.Mutate != nil {
		o.Mutate(f)
	}
	return f
}

type head struct {
	Type  string          `json:"type"`
	ID    json.RawMessage `json:"id"`
	ReqID string          `json:"_reqId"`
}

func (c *Client) readLoop() {
	defer close(c.done)
	for {
		_, data, err := c.ws.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				c.closeCE.Store(ce)
			}
			c.err.Store(err)
			c.mu.Lock()
			for k, ch := range c.pending {
				close(ch)
				delete(c.pending, k)
			}
			c.mu.Unlock()
			return
		}
		var h head
		_ = json.Unmarshal(data, &h)
		f := Frame{Type: h.Type, Raw: json.RawMessage(data)}
		if c.deliverPending(h, f) {
			continue
		}
		c.events <- f
	}
}

// deliverPending hands replies to their waiters: acks by id, anything else
// by _reqId, errors by either.
func (c *Client) deliverPending(h head, f Frame) bool {
	var key string
	if h.Type == "ack" || h.Type == "error" {
		if id, err := strconv.Unquote(string(h.ID)); err == nil && id != "" {
			key = "id:" + id
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if ch, ok := c.pending[key]; ok && key != "" {
		delete(c.pending, key)
		ch <- f
		return true
	}
	if h.ReqID != "" {
		if ch, ok := c.pending["req:"+h.ReqID]; ok {
			delete(c.pending, "req:"+h.ReqID)
			ch <- f
			return true
		}
	}
	return false
}

func (c *Client) requeue(f Frame) {
	// Put back at the end; only used during the handshake.
	go func() { c.events <- f }()
}

// WriteJSON sends one frame.
func (c *Client) WriteJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.WriteRaw(b)
}

// WriteRaw sends raw bytes as one text frame.
func (c *Client) WriteRaw(b []byte) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	_ = c.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
	return c.ws.WriteMessage(websocket.TextMessage, b)
}

// Next returns the next unsolicited frame (pushes, replies nobody waits for).
func (c *Client) Next(ctx context.Context) (Frame, error) {
	select {
	case f := <-c.events:
		return f, nil
	default:
	}
	select {
	case f := <-c.events:
		return f, nil
	case <-c.done:
		select {
		case f := <-c.events:
			return f, nil
		default:
		}
		return Frame{}, c.Err()
	case <-ctx.Done():
		return Frame{}, ctx.Err()
	}
}

// Events exposes the unsolicited frames as a channel.
func (c *Client) Events() <-chan Frame { return c.events }

// Done is closed when the connection ends.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the connection ended (nil while open).
func (c *Client) Err() error {
	if err, ok := c.err.Load().(error); ok {
		return err
	}
	select {
	case <-c.done:
		return net.ErrClosed
	default:
		return nil
	}
}

// CloseError is the close frame the broker sent, if any.
func (c *Client) CloseError() *websocket.CloseError { return c.closeCE.Load() }

// NewReqID returns a fresh correlation id.
func (c *Client) NewReqID() string { return "r" + strconv.FormatUint(c.nextID.Add(1), 10) }

func (c *Client) await(ctx context.Context, key string, frame any) (Frame, error) {
	ch := make(chan Frame, 1)
	c.mu.Lock()
	c.pending[key] = ch
	c.mu.Unlock()
	if err := c.WriteJSON(frame); err != nil {
		c.mu.Lock()
		delete(c.pending, key)
		c.mu.Unlock()
		return Frame{}, err
	}
	select {
	case f, ok := <-ch:
		if !ok {
			return Frame{}, fmt.Errorf("connection closed: %w", c.Err())
		}
		return f, nil
	case <-c.done:
		// The reader had already ended (and dropped the waiters) when this
		// one registered. A reply it delivered before ending is in ch.
		select {
		case f, ok := <-ch:
			if ok {
				return f, nil
			}
		default:
			c.mu.Lock()
			delete(c.pending, key)
			c.mu.Unlock()
		}
		return Frame{}, fmt.Errorf("connection closed: %w", c.Err())
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.pending, key)
		c.mu.Unlock()
		return Frame{}, ctx.Err()
	}
}

// Request sends frame with a fresh _reqId and waits for the reply that
// echoes it. A reply of type "error" is returned as a *ErrorReply.
func (c *Client) Request(ctx context.Context, frame map[string]any) (Frame, error) {
	id := c.NewReqID()
	frame["_reqId"] = id
	f, err := c.await(ctx, "req:"+id, frame)
	if err != nil {
		return f, err
	}
	if f.Type == "error" {
		var e protocol.ErrorFrame
		_ = f.Decode(&e)
		return f, &ErrorReply{Code: string(e.Code), Message: e.Message}
	}
	return f, nil
}

// ErrorReply is an error frame answering a request.
type ErrorReply struct{ Code, Message string }

func (e *ErrorReply) Error() string { return e.Code + ": " + e.Message }

// SendRequest is a send frame's content.
type SendRequest struct {
	TargetSpec         string
	Priority           string // "" omits the field
	Nonce, Ciphertext  string
	ClientMessageID    string
	RequestFingerprint string
	ID                 string // correlation id; empty: generated
}

// Send sends a message and waits for its ack.
func (c *Client) Send(ctx context.Context, r SendRequest) (protocol.Ack, error) {
	if r.ID == "" {
		r.ID = "s" + strconv.FormatUint(c.nextID.Add(1), 10) + "-" + randomHex(4)
	}
	f := map[string]any{"type": "send", "id": r.ID, "targetSpec": r.TargetSpec, "nonce": r.Nonce, "ciphertext": r.Ciphertext}
	if r.Priority != "" {
		f["priority"] = r.Priority
	}
	if r.ClientMessageID != "" {
		f["client_message_id"] = r.ClientMessageID
	}
	if r.RequestFingerprint != "" {
		f["request_fingerprint"] = r.RequestFingerprint
	}
	reply, err := c.await(ctx, "id:"+r.ID, f)
	if err != nil {
		return protocol.Ack{}, err
	}
	var ack protocol.Ack
	if err := reply.Decode(&ack); err != nil {
		return ack, err
	}
	if reply.Type == "error" {
		var e protocol.ErrorFrame
		_ = reply.Decode(&e)
		return ack, &ErrorReply{Code: string(e.Code), Message: e.Message}
	}
	return ack, nil
}

// SendSealed encrypts plaintext for recipient and sends it to target.
func (c *Client) SendSealed(ctx context.Context, target string, recipient ed25519.PublicKey, priority string, plaintext []byte) (protocol.Ack, error) {
	key := c.ID.Key
	if c.Opts.Session != nil {
		key = c.Opts.Session.Key
	}
	nonce, ct, err := Seal(plaintext, recipient, key)
	if err != nil {
		return protocol.Ack{}, err
	}
	return c.Send(ctx, SendRequest{TargetSpec: target, Priority: priority, Nonce: nonce, Ciphertext: ct})
}

// ClientAck acknowledges a push.
func (c *Client) ClientAck(brokerMessageID, clientMessageID string) error {
	f := map[string]any{"type": "client_ack"}
	if brokerMessageID != "" {
		f["brokerMessageId"] = brokerMessageID
	}
	if clientMessageID != "" {
		f["clientMessageId"] = clientMessageID
	}
	return c.WriteJSON(f)
}

// ListPeers asks for peers_list.
func (c *Client) ListPeers(ctx context.Context) ([]protocol.PeerInfo, error) {
	f, err := c.Request(ctx, map[string]any{"type": "list_peers"})
	if err != nil {
		return nil, err
	}
	var pl protocol.PeersList
	if err := f.Decode(&pl); err != nil {
		return nil, err
	}
	return pl.Peers, nil
}

// Close sends a normal close frame and closes the connection.
func (c *Client) Close() error {
	c.writeMu.Lock()
	_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	c.writeMu.Unlock()
	select {
	case <-c.done:
	case <-time.After(2 * time.Second):
	}
	return c.ws.Close()
}

// Kill drops the TCP connection without a close frame, as a crashed
// client or a dead network would.
func (c *Client) Kill() {
	_ = c.ws.NetConn().Close()
	<-c.done
}
