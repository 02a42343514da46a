package client

import (
	"context"
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

// Frame is one inbound frame: its type and raw JSON.
type Frame struct {
	Type string
	Raw  json.RawMessage
}

// Decode unmarshals the frame into v.
func (f Frame) Decode(v any) error { return json.Unmarshal(f.Raw, v) }

// Client is one logical connection to a broker: one socket at a time, and
// with Options.Reconnect a new one after each loss, resuming the same
// lease. Frames keep arriving on the same Events channel across sockets.
//
// Concurrency: one goroutine per Client (run) owns the reading side of the
// current socket, delivers frames to request waiters or to events, and, on
// a loss, redials; so a Client never has two readers. Writers share the
// current socket under that socket's writeMu. pending, lastAck and termErr
// are guarded by mu. All methods are safe for concurrent use; Receive and
// Next consume the same stream, so one consumer should use one of them.
type Client struct {
	// Set by Connect, never changed afterwards.
	ID       Identity
	Opts     Options           // as given, with SessionID filled in
	HelloAck protocol.HelloAck // the first hello's ack; LastHelloAck has the latest
	AckRaw   json.RawMessage   // the first hello_ack as received
	url      string
	events   chan Frame      // never closed
	done     chan struct{}   // closed when the Client has ended for good
	ctx      context.Context // cancelled by Close and Kill: stops redials
	cancel   context.CancelFunc

	cur     atomic.Pointer[conn]                 // the live socket; nil while reconnecting and at the end
	closeCE atomic.Pointer[websocket.CloseError] // the close frame that ended the latest socket, if it had one
	nextID  atomic.Uint64

	mu         sync.Mutex
	pending    map[string]*waiter // "req:"+_reqId or "id:"+send id -> its waiter
	lastAck    protocol.HelloAck
	lastAckRaw json.RawMessage
	termErr    error // why the Client ended; set just before done closes

	recv recvState // Receive's duplicate filter, guarded by itself
}

// conn is one socket of a Client.
type conn struct {
	ws      *websocket.Conn
	writeMu sync.Mutex // serializes writes to ws
}

// waiter is a request waiting for its reply. err is set (under Client.mu)
// before ch is closed without a reply.
type waiter struct {
	ch  chan Frame
	err error
}

// Connect dials url (ws://host:port/ws), sends the hello (a session_hello
// with opts.Session) and waits for hello_ack. A hello refused by the broker
// is a *HandshakeError.
//
// Hellos are signed over a millisecond timestamp and the broker may accept
// a signed hello only once, so a hello refused as hello_replayed (two
// connections of one key signing in the same millisecond) is signed again
// and resent, up to three times.
func Connect(ctx context.Context, url string, id Identity, opts Options) (*Client, error) {
	if opts.SessionID == "" {
		opts.SessionID = "go-" + randomHex(6)
	}
	buf := opts.EventBuffer
	if buf <= 0 {
		buf = 4096
	}
	c := &Client{ID: id, Opts: opts, url: url, events: make(chan Frame, buf), done: make(chan struct{}), pending: map[string]*waiter{}}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	cn, res, err := c.dialHello(ctx, opts.ResumeToken)
	if err != nil {
		c.cancel()
		return nil, err
	}
	c.HelloAck, c.AckRaw = res.ack, res.raw
	c.lastAck, c.lastAckRaw = res.ack, res.raw
	c.cur.Store(cn)
	go c.run(cn, res.early)
	return c, nil
}

// dialHello opens a socket and completes one hello on it.
func (c *Client) dialHello(ctx context.Context, resumeToken string) (*conn, handshakeResult, error) {
	timeout := c.Opts.HelloTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	hooks := c.Opts.hooks
	for attempt := 1; ; attempt++ {
		ws, err := Dial(ctx, c.url, c.Opts.Header)
		if err != nil {
			return nil, handshakeResult{}, err
		}
		if hooks != nil && hooks.NoPong {
			ws.SetPingHandler(func(string) error { return nil })
		}
		res, err := handshake(ctx, ws, helloFrame(c.ID, c.Opts, resumeToken), timeout)
		if err == nil {
			return &conn{ws: ws}, res, nil
		}
		_ = ws.Close()
		var he *HandshakeError
		if !errors.As(err, &he) || he.Code != string(protocol.CodeHelloReplayed) || attempt == 3 || (hooks != nil && hooks.Mutate != nil) {
			return nil, res, err
		}
		select { // the next millisecond gives a new timestamp, so a new signature
		case <-ctx.Done():
			return nil, res, err
		case <-time.After(time.Millisecond):
		}
	}
}

// run reads the current socket until it ends, then either ends the Client
// or, with Options.Reconnect, redials and carries on with the new socket.
func (c *Client) run(cn *conn, early []Frame) {
	defer close(c.done)
	for {
		for _, f := range early {
			if !c.deliver(f) {
				break
			}
		}
		err := c.read(cn)
		c.dropped(cn, err)
		if c.ctx.Err() != nil {
			c.finish(err)
			return
		}
		var ce *websocket.CloseError
		if c.Opts.Reconnect == nil || (errors.As(err, &ce) && terminalClose(ce)) {
			c.finish(err)
			return
		}
		if cb := c.Opts.Reconnect.OnDisconnect; cb != nil {
			cb(err)
		}
		var res handshakeResult
		cn, res, err = c.redial()
		if err != nil {
			c.finish(err)
			return
		}
		early = res.early
	}
}

// terminalClose reports whether a close frame means "do not come back":
// kicked (4001), revoked (4002), a policy rejection (1008), or our lease
// taken over by another socket of the same session (1000
// session_replaced), which a reconnect would only take back.
func terminalClose(ce *websocket.CloseError) bool {
	switch ce.Code {
	case protocol.CloseKicked.Code, protocol.CloseBanned.Code, protocol.CloseHelloRejectedTag:
		return true
	case websocket.CloseNormalClosure:
		return ce.Text == protocol.CloseSessionReplaced.Reason
	}
	return false
}

type head struct {
	Type  string          `json:"type"`
	ID    json.RawMessage `json:"id"`
	ReqID string          `json:"_reqId"`
}

// read delivers the socket's frames until it fails, and returns why.
func (c *Client) read(cn *conn) error {
	for {
		_, data, err := cn.ws.ReadMessage()
		if err != nil {
			return err
		}
		var h head
		_ = json.Unmarshal(data, &h)
		f := Frame{Type: h.Type, Raw: json.RawMessage(data)}
		if c.deliverPending(h, f) {
			continue
		}
		if !c.deliver(f) {
			return ErrClosed
		}
	}
}

// deliver queues an unsolicited frame, blocking while the buffer is full
// (so the broker's outbound queue absorbs the backlog); false once the
// Client is closing.
func (c *Client) deliver(f Frame) bool {
	select {
	case c.events <- f:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// dropped retires a socket: it records the close frame, closes the TCP
// connection and fails every waiting request.
func (c *Client) dropped(cn *conn, err error) {
	var ce *websocket.CloseError
	errors.As(err, &ce)
	c.closeCE.Store(ce) // nil when this socket ended without a close frame
	c.cur.CompareAndSwap(cn, nil)
	_ = cn.ws.Close()
	lost := fmt.Errorf("%w: %v", ErrConnectionLost, err)
	c.mu.Lock()
	for k, w := range c.pending {
		w.err = lost
		close(w.ch)
		delete(c.pending, k)
	}
	c.mu.Unlock()
}

func (c *Client) finish(err error) {
	if err == nil {
		err = net.ErrClosed
	}
	c.mu.Lock()
	c.termErr = err
	c.mu.Unlock()
	c.cancel()
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
	if w, ok := c.pending[key]; ok && key != "" {
		delete(c.pending, key)
		w.ch <- f
		return true
	}
	if h.ReqID != "" {
		if w, ok := c.pending["req:"+h.ReqID]; ok {
			delete(c.pending, "req:"+h.ReqID)
			w.ch <- f
			return true
		}
	}
	return false
}

// WriteJSON sends one frame.
func (c *Client) WriteJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.WriteRaw(b)
}

// WriteRaw sends raw bytes as one text frame. While a reconnecting client
// has no socket it returns ErrNotConnected; after the end, an error
// wrapping Err.
func (c *Client) WriteRaw(b []byte) error {
	cn := c.cur.Load()
	if cn == nil {
		select {
		case <-c.done:
			return fmt.Errorf("write: connection ended: %w", c.Err())
		default:
			return ErrNotConnected
		}
	}
	cn.writeMu.Lock()
	defer cn.writeMu.Unlock()
	_ = cn.ws.SetWriteDeadline(time.Now().Add(10 * time.Second))
	return cn.ws.WriteMessage(websocket.TextMessage, b)
}

// Next returns the next unsolicited frame (pushes, replies nobody waits
// for), across reconnects. After the Client has ended it returns what is
// still buffered, then Err.
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

// Events exposes the unsolicited frames as a channel (never closed; watch
// Done).
func (c *Client) Events() <-chan Frame { return c.events }

// Done is closed when the Client has ended: its socket is gone and, with
// Options.Reconnect, it has stopped reconnecting (Close, Kill, a terminal
// close such as kicked or revoked, or MaxAttempts failures).
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the Client ended (nil while it runs, reconnecting included):
// the read error that ended the last socket, or the reconnect failure.
func (c *Client) Err() error {
	c.mu.Lock()
	err := c.termErr
	c.mu.Unlock()
	if err != nil {
		return err
	}
	select {
	case <-c.done:
		return net.ErrClosed
	default:
		return nil
	}
}

// CloseError is the close frame that ended the most recently ended
// socket; nil if none has ended or it ended without one (a dropped
// connection, 1006).
func (c *Client) CloseError() *websocket.CloseError { return c.closeCE.Load() }

// Connected reports whether the Client has a socket right now.
func (c *Client) Connected() bool { return c.cur.Load() != nil }

// LastHelloAck is the ack of the latest successful hello (the first one
// until a reconnect) and its raw JSON.
func (c *Client) LastHelloAck() (protocol.HelloAck, json.RawMessage) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastAck, c.lastAckRaw
}

// NewReqID returns a fresh correlation id.
func (c *Client) NewReqID() string { return "r" + strconv.FormatUint(c.nextID.Add(1), 10) }

func (c *Client) await(ctx context.Context, key string, frame any) (Frame, error) {
	w := &waiter{ch: make(chan Frame, 1)}
	c.mu.Lock()
	c.pending[key] = w
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		if c.pending[key] == w {
			delete(c.pending, key)
		}
		c.mu.Unlock()
	}
	if err := c.WriteJSON(frame); err != nil {
		forget()
		return Frame{}, err
	}
	select {
	case f, ok := <-w.ch:
		if !ok {
			return Frame{}, w.err
		}
		return f, nil
	case <-c.done:
		// The reader had already ended (and dropped the waiters) when this
		// one registered. A reply it delivered before ending is in w.ch.
		select {
		case f, ok := <-w.ch:
			if ok {
				return f, nil
			}
			return Frame{}, w.err
		default:
			forget()
		}
		return Frame{}, fmt.Errorf("%w: %w", ErrConnectionLost, c.Err())
	case <-ctx.Done():
		forget()
		return Frame{}, ctx.Err()
	}
}

// Request sends frame with a fresh _reqId and waits for the reply that
// echoes it. A reply of type "error" is returned as a *ErrorReply; a socket
// lost before the reply, as ErrConnectionLost.
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

// Close ends the Client: it stops reconnecting, sends a normal close frame
// (so the broker ends the lease at once rather than after its grace) and
// closes the connection.
func (c *Client) Close() error {
	c.cancel()
	cn := c.cur.Load()
	if cn != nil {
		cn.writeMu.Lock()
		_ = cn.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
		cn.writeMu.Unlock()
		select {
		case <-c.done:
		case <-time.After(2 * time.Second):
		}
		_ = cn.ws.Close()
	}
	<-c.done
	return nil
}

// Kill drops the TCP connection without a close frame, as a crashed
// client or a dead network would, and stops reconnecting; the broker keeps
// the lease for its grace period.
func (c *Client) Kill() {
	c.cancel()
	if cn := c.cur.Load(); cn != nil {
		_ = cn.ws.NetConn().Close()
	}
	<-c.done
}

// SignMemberRequest returns the headers that prove membership to the
// member HTTP routes (GET /mesh/:id/members, PATCH /mesh/:id/member/:id,
// PATCH /mesh/:id/settings): the member id, the time and the member key's
// signature over the method, path, time and body.
func SignMemberRequest(id Identity, method, path string, body []byte, now time.Time) http.Header {
	ts := now.UnixMilli()
	h := http.Header{}
	h.Set("X-Member-Id", id.MemberID)
	h.Set("X-Claudemesh-Timestamp", strconv.FormatInt(ts, 10))
	h.Set("X-Claudemesh-Signature", protocol.Sign(id.Key, protocol.MemberRequestSigningString(id.MeshID, id.MemberID, method, path, ts, body)))
	return h
}
