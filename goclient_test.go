package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/internal/clienttest"
	"github.com/claudemesh/meshbroker/protocol"
)

// End-to-end tests of package client's own behaviour (Receive, typed send
// errors, reconnect), against a real broker. They also run the code the
// package's Example functions show, which cannot run there: package client
// cannot start a broker without importing the root package.

// tcpProxy forwards loopback TCP connections to the broker so a test can
// cut a client's socket from the outside, as a network drop would, refuse
// new connections for a while, or swallow what the client sends.
type tcpProxy struct {
	t       *testing.T
	ln      net.Listener
	target  string
	refuse  atomic.Bool  // close new connections at once
	swallow atomic.Bool  // drop client->broker bytes
	dropped atomic.Int64 // bytes swallowed

	mu       sync.Mutex
	pairs    [][2]net.Conn
	orphaned map[net.Conn]bool // broker sides kept open after cutClientSide
	wg       sync.WaitGroup
}

func newProxy(t *testing.T, b *testBroker) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{t: t, ln: ln, target: fmt.Sprintf("127.0.0.1:%d", b.Port())}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		_ = ln.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *tcpProxy) url() string { return "ws://" + p.ln.Addr().String() + "/ws" }

func (p *tcpProxy) accept() {
	defer p.wg.Done()
	for {
		down, err := p.ln.Accept()
		if err != nil {
			return
		}
		if p.refuse.Load() {
			_ = down.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = down.Close()
			continue
		}
		p.mu.Lock()
		p.pairs = append(p.pairs, [2]net.Conn{down, up})
		p.mu.Unlock()
		p.wg.Add(2)
		go func() {
			defer p.wg.Done()
			p.pipe(up, down, true)
			_ = down.Close()
			if !p.isOrphaned(up) {
				_ = up.Close()
			}
		}()
		go func() {
			defer p.wg.Done()
			_, _ = io.Copy(down, up)
			_ = down.Close()
			if p.isOrphaned(up) {
				_, _ = io.Copy(io.Discard, up) // the broker writes on into a socket nobody reads
			}
			_ = up.Close()
		}()
	}
}

// pipe copies the client's bytes to the broker, or swallows them.
func (p *tcpProxy) pipe(dst, src net.Conn, fromClient bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if fromClient && p.swallow.Load() {
				p.dropped.Add(int64(n))
			} else if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// cut closes every forwarded connection on both sides, without close
// frames: the broker sees a dead socket (grace), the client a read error.
// It also closes the broker sides cutClientSide left open.
func (p *tcpProxy) cut() {
	p.mu.Lock()
	pairs := p.pairs
	p.pairs = nil
	var orphans []net.Conn
	for c := range p.orphaned {
		orphans = append(orphans, c)
	}
	p.mu.Unlock()
	for _, pr := range pairs {
		_ = pr[0].Close()
		_ = pr[1].Close()
	}
	for _, c := range orphans {
		_ = c.Close()
	}
}

// cutClientSide closes only the client's side: the client sees its socket
// fail while the broker's stays open and, as far as it can tell, alive
// (a half-open connection, as after a NAT or Wi-Fi change).
func (p *tcpProxy) cutClientSide() {
	p.mu.Lock()
	pairs := p.pairs
	p.pairs = nil
	if p.orphaned == nil {
		p.orphaned = map[net.Conn]bool{}
	}
	for _, pr := range pairs {
		p.orphaned[pr[1]] = true
	}
	p.mu.Unlock()
	for _, pr := range pairs {
		_ = pr[0].Close()
	}
}

func (p *tcpProxy) isOrphaned(up net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.orphaned[up]
}

// reconnecting connects id through the proxy with a fast reconnect policy
// and returns channels fed by its callbacks.
func reconnecting(t *testing.T, b *testBroker, p *tcpProxy, id client.Identity, opts client.Options) (*client.Client, chan protocol.HelloAck, chan error) {
	t.Helper()
	acks, drops := make(chan protocol.HelloAck, 16), make(chan error, 16)
	opts.Reconnect = &client.ReconnectPolicy{
		MinDelay: 5 * time.Millisecond, MaxDelay: 50 * time.Millisecond,
		OnReconnect:  func(a protocol.HelloAck) { acks <- a },
		OnDisconnect: func(err error) { drops <- err },
	}
	if opts.Cwd == "" {
		opts.Cwd = "/work/" + id.DisplayName
	}
	c, err := client.Connect(ctxT(t), p.url(), id, opts)
	if err != nil {
		t.Fatalf("connect %s through the proxy: %v", id.DisplayName, err)
	}
	t.Cleanup(c.Kill)
	return c, acks, drops
}

func recvT(t *testing.T, c *client.Client) client.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := c.Receive(ctx)
	if err != nil {
		t.Fatalf("receive: %v", err)
	}
	return m
}

func waitAck[T any](t *testing.T, ch chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// Receive opens a DM with the key it was sealed to (session key, else
// member key), decodes the sender and acks it; multicast bodies come back
// decoded from base64; system pushes are skipped.
func TestGoClientReceive(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	sa, sb := client.NewSession(), client.NewSession()
	alice := b.connect(f.a, client.Options{Session: &sa, DisplayName: "alice-s"})
	bob := b.connect(f.b, client.Options{Session: &sb}) // bob's only connection

	toSession, err := alice.SendDirect(ctxT(t), pub(sb.Key), client.PriorityNow, []byte("to your session"))
	if err != nil || !toSession.Queued {
		t.Fatalf("send: %+v %v", toSession, err)
	}
	m := recvT(t, bob)
	if string(m.Plaintext) != "to your session" || !m.Direct || m.ID != toSession.MessageID || m.Priority != client.PriorityNow ||
		!bytes.Equal(m.Sender, pub(sa.Key)) || m.Recipient != sb.Pubkey() || m.MeshID != f.meshID || m.CreatedAt.IsZero() {
		t.Fatalf("message %+v", m)
	}
	// Sealed to the member key and addressed to it: it reaches bob's one
	// connection and opens with the member key.
	toMember, err := alice.SendDirect(ctxT(t), pub(f.b.Key), client.PriorityLow, []byte("to the member"))
	if err != nil {
		t.Fatal(err)
	}
	m = recvT(t, bob)
	if string(m.Plaintext) != "to the member" || m.Recipient != f.b.Pubkey() || m.ID != toMember.MessageID || m.Priority != client.PriorityLow {
		t.Fatalf("member-key DM %+v", m)
	}
	for _, id := range []string{toSession.MessageID, toMember.MessageID} {
		waitFor(t, 10*time.Second, "auto client_ack marks the row delivered", func() bool { return b.row(id).DeliveredAt != nil })
	}
	// A broadcast: base64 body, sender's member key and name, no ack needed.
	bc, err := alice.SendMulticast(ctxT(t), "*", "", []byte("hello all"))
	if err != nil {
		t.Fatal(err)
	}
	m = recvT(t, bob)
	if string(m.Plaintext) != "hello all" || m.Direct || m.ID != bc.MessageID || m.Priority != client.PriorityNext ||
		!bytes.Equal(m.SenderMember, pub(f.a.Key)) || !bytes.Equal(m.Sender, pub(sa.Key)) || m.SenderName != "alice-s" {
		t.Fatalf("broadcast %+v", m)
	}
	// Garbage sealed to bob: returned with ErrUnreadable, still acked.
	bad, err := alice.Send(ctxT(t), client.SendRequest{TargetSpec: sb.Pubkey(), Priority: client.PriorityNow, Nonce: "", Ciphertext: "eA=="})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err = bob.Receive(ctx)
	if !errors.Is(err, client.ErrUnreadable) || m.ID != bad.MessageID {
		t.Fatalf("unreadable DM: %+v %v", m, err)
	}
	waitFor(t, 10*time.Second, "unreadable DM acked", func() bool { return b.row(bad.MessageID).DeliveredAt != nil })
}

// The fan-out rule the package documents: a DM to a member key is one
// row, taken by exactly one of that member's connections.
func TestGoClientMemberKeyReachesOneSession(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	s1, s2 := client.NewSession(), client.NewSession()
	b1 := b.connect(f.b, client.Options{Session: &s1})
	b2 := b.connect(f.b, client.Options{Session: &s2})
	ack, err := alice.SendDirect(ctxT(t), pub(f.b.Key), client.PriorityNow, []byte("one of you"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make(chan string, 2)
	for _, c := range []*client.Client{b1, b2} {
		go func() {
			if m, err := c.Receive(ctx); err == nil {
				got <- m.ID + " " + m.Recipient
			} else {
				got <- ""
			}
		}()
	}
	if first := waitAck(t, got, "the DM at one of bob's sessions"); first != ack.MessageID+" "+f.b.Pubkey() {
		t.Fatalf("delivery %q, want %s", first, ack.MessageID)
	}
	select {
	case second := <-got:
		t.Fatalf("a second delivery: %q", second)
	case <-time.After(200 * time.Millisecond):
	}
	cancel()
	if rest := <-got; rest != "" {
		t.Fatalf("a second delivery: %q", rest)
	}
}

// With ManualAck, Receive does not ack: the row stays undelivered until
// Ack. A connection that has never acked has its pushes marked delivered
// by the pong that confirms them (M3), so bob acks a first message by hand
// to become a connection that acks; only then does an unacked row show.
func TestGoClientManualAck(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{ManualAck: true})
	send := func(text string) (string, client.Message) {
		t.Helper()
		ack, err := alice.SendDirect(ctxT(t), pub(f.b.Key), client.PriorityNow, []byte(text))
		if err != nil {
			t.Fatal(err)
		}
		m := recvT(t, bob)
		if string(m.Plaintext) != text {
			t.Fatalf("%+v", m)
		}
		return ack.MessageID, m
	}
	firstID, first := send("first")
	if err := bob.Ack(first); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "Ack marks the first row delivered", func() bool { return b.row(firstID).DeliveredAt != nil })

	id, m := send("ack me")
	// A round trip on bob's socket after the push, then a while: an auto
	// ack would have been processed and its mark committed.
	if _, err := bob.ListPeers(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if b.row(id).DeliveredAt != nil {
			t.Fatal("ManualAck client acked on its own")
		}
	}
	if err := bob.Ack(m); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "Ack marks the row delivered", func() bool { return b.row(id).DeliveredAt != nil })
}

// A refused send is an error the caller can inspect, and the ack still
// comes back for callers that read ack.Error.
func TestGoClientSendRejected(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	for _, tt := range []struct {
		req              client.SendRequest
		code, text       string
		temporary        bool
		errorTextContain string
	}{
		{client.SendRequest{TargetSpec: strings.Repeat("f", 64)}, client.SendNoRecipient,
			"no connected peer for target (not online, or targetSpec is your own key without another session)", true, "send rejected: no_recipient: no connected peer"},
		{client.SendRequest{TargetSpec: "*", Priority: "urgent"}, client.SendInvalid,
			"invalid_argument: priority must be one of now, next, low", false, "send rejected: invalid_argument: priority must be"},
		{client.SendRequest{TargetSpec: "#" + strings.Repeat("x", 32)}, client.SendNotFound,
			"not_found: topic " + strings.Repeat("x", 32), false, "send rejected: not_found: topic"},
	} {
		ack, err := alice.Send(ctxT(t), tt.req)
		var se *client.SendError
		if !errors.As(err, &se) {
			t.Fatalf("%s: want *client.SendError, got %v", tt.req.TargetSpec, err)
		}
		if se.Code != tt.code || se.Message != tt.text || se.Temporary() != tt.temporary || se.ID == "" || se.ID != ack.ID ||
			ack.Error != tt.text || ack.Queued || !strings.HasPrefix(err.Error(), tt.errorTextContain) {
			t.Fatalf("%s: %+v (%q), ack %+v", tt.req.TargetSpec, se, err, ack)
		}
	}
	if n := b.countRows(f.meshID); n != 0 {
		t.Fatalf("%d rows stored by refused sends", n)
	}
}

// A refused hello names its code once.
func TestGoClientHandshakeErrorText(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	_, err := b.tryConnect(f.a, clienttest.Mutate(client.Options{}, func(m map[string]any) { m["memberId"] = "other" }))
	var he *client.HandshakeError
	if !errors.As(err, &he) || he.Code != "bad_signature" || err.Error() != "hello rejected: bad_signature" {
		t.Fatalf("got %v", err)
	}
	_, err = b.tryConnect(f.r, client.Options{})
	if !errors.As(err, &he) || !strings.HasPrefix(err.Error(), "hello rejected: revoked: You've been removed from ") {
		t.Fatalf("got %v", err)
	}
}

// Options.Reconnect: a socket cut from outside is redialled and the lease
// resumed with the same session key and resume token: the same presence,
// no peer_left or peer_joined at an observer, and a DM queued during the
// outage arrives on the same Client. Writes in between say
// ErrNotConnected.
func TestGoClientReconnectResumesLease(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(20*time.Second))
	f := b.fixture()
	p := newProxy(t, b)
	bob := b.connect(f.b, client.Options{})
	sess := client.NewSession()
	var mu sync.Mutex
	var sentTokens []any // each hello's resumeToken field
	alice, acks, drops := reconnecting(t, b, p, f.a, clienttest.Mutate(client.Options{Session: &sess}, func(m map[string]any) {
		mu.Lock()
		defer mu.Unlock()
		sentTokens = append(sentTokens, m["resumeToken"])
	}))
	first := alice.HelloAck
	if first.ResumeToken == "" {
		t.Fatalf("no resume token: %s", alice.AckRaw)
	}
	waitFrame(t, bob, 10*time.Second, func(fr client.Frame) bool {
		return isEvent("peer_joined")(fr) && strings.Contains(string(fr.Raw), sess.Pubkey())
	})

	p.refuse.Store(true) // keep alice out until the DM below is queued
	p.cut()
	waitAck(t, drops, "OnDisconnect")
	if err := alice.WriteJSON(map[string]any{"type": "list_peers"}); !errors.Is(err, client.ErrNotConnected) {
		t.Fatalf("write while reconnecting: %v", err)
	}
	b.waitOffline(first.PresenceID)
	ack, err := bob.SendDirect(ctxT(t), pub(sess.Key), client.PriorityNext, []byte("while you were away"))
	if err != nil || !ack.Queued {
		t.Fatalf("DM to a lease in grace: %+v %v", ack, err)
	}
	p.refuse.Store(false)

	again := waitAck(t, acks, "OnReconnect")
	if again.PresenceID != first.PresenceID || again.ResumeToken == "" {
		t.Fatalf("reconnect ack %+v, want presence %s", again, first.PresenceID)
	}
	if last, _ := alice.LastHelloAck(); last.PresenceID != first.PresenceID || alice.HelloAck.PresenceID != first.PresenceID || !alice.Connected() {
		t.Fatalf("state after reconnect: %+v", last)
	}
	mu.Lock()
	if last := sentTokens[len(sentTokens)-1]; sentTokens[0] != nil || last != first.ResumeToken {
		t.Fatalf("hellos carried tokens %v; want none first, then %s", sentTokens, first.ResumeToken)
	}
	mu.Unlock()
	m := recvT(t, alice)
	if string(m.Plaintext) != "while you were away" || m.ID != ack.MessageID || !bytes.Equal(m.Sender, pub(f.b.Key)) {
		t.Fatalf("queued DM %+v", m)
	}
	// And the new socket carries requests and pushes as the old one did.
	if peers, err := alice.ListPeers(ctxT(t)); err != nil || len(peers) == 0 {
		t.Fatalf("list_peers after reconnect: %v %v", peers, err)
	}
	if _, err := bob.SendDirect(ctxT(t), pub(sess.Key), client.PriorityNow, []byte("and now")); err != nil {
		t.Fatal(err)
	}
	if m := recvT(t, alice); string(m.Plaintext) != "and now" {
		t.Fatalf("%+v", m)
	}
	if got := collect(bob, 100*time.Millisecond, func(fr client.Frame) bool {
		return (isEvent("peer_left")(fr) || isEvent("peer_joined")(fr) || isEvent("peer_returned")(fr)) && strings.Contains(string(fr.Raw), sess.Pubkey())
	}); len(got) != 0 {
		t.Fatalf("the observer saw the outage: %s", got[0].Raw)
	}
	select {
	case <-alice.Done():
		t.Fatalf("client ended: %v", alice.Err())
	default:
	}
}

// A request waiting when the socket goes fails with ErrConnectionLost;
// after the reconnect the same call works.
func TestGoClientReconnectFailsPending(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(20*time.Second))
	f := b.fixture()
	p := newProxy(t, b)
	sess := client.NewSession()
	alice, acks, _ := reconnecting(t, b, p, f.a, client.Options{Session: &sess})
	p.swallow.Store(true) // the request never reaches the broker, so it cannot be answered
	res := make(chan error, 1)
	go func() { _, err := alice.ListPeers(context.Background()); res <- err }()
	waitFor(t, 10*time.Second, "the request on the wire", func() bool { return p.dropped.Load() > 0 })
	p.swallow.Store(false)
	p.cut()
	if err := waitAck(t, res, "the pending request to fail"); !errors.Is(err, client.ErrConnectionLost) {
		t.Fatalf("pending request: %v", err)
	}
	if a := waitAck(t, acks, "OnReconnect"); a.PresenceID != alice.HelloAck.PresenceID {
		t.Fatalf("new presence %s", a.PresenceID)
	}
	if _, err := alice.ListPeers(ctxT(t)); err != nil {
		t.Fatalf("after reconnect: %v", err)
	}
}

// A terminal close (kicked) ends a reconnecting client instead of
// bringing it back; so does Close while it is redialling.
func TestGoClientReconnectStops(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(20*time.Second))
	f := b.fixture()
	p := newProxy(t, b)
	admin := b.connect(f.a, client.Options{})
	sb := client.NewSession()
	bob, acks, _ := reconnecting(t, b, p, f.b, client.Options{Session: &sb})
	if _, err := admin.Request(ctxT(t), map[string]any{"type": "kick", "target": f.b.Pubkey()}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-bob.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("kicked client still running")
	}
	if ce := bob.CloseError(); ce == nil || ce.Code != 4001 || bob.Err() == nil {
		t.Fatalf("close %+v err %v", ce, bob.Err())
	}
	select {
	case a := <-acks:
		t.Fatalf("reconnected after a kick: %+v", a)
	default:
	}

	sc := client.NewSession()
	carol, _, drops := reconnecting(t, b, p, f.c, client.Options{Session: &sc})
	p.refuse.Store(true)
	p.cut()
	waitAck(t, drops, "OnDisconnect")
	done := make(chan struct{})
	go func() { _ = carol.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hangs while reconnecting")
	}
	if !errors.Is(carol.Err(), client.ErrClosed) {
		t.Fatalf("err after Close: %v", carol.Err())
	}
}

// The package example's flow, end to end: a session connects, DMs a
// member, the member reads it and replies to the sender key.
func TestGoClientExampleFlow(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	sess := client.NewSession()
	alice := b.connect(f.a, client.Options{Session: &sess, Reconnect: &client.ReconnectPolicy{}})
	bob := b.connect(f.b, client.Options{})
	if _, err := alice.SendDirect(ctxT(t), pub(f.b.Key), client.PriorityNow, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	m := recvT(t, bob)
	if _, err := bob.SendSealed(ctxT(t), hex.EncodeToString(m.Sender), m.Sender, client.PriorityNow, append([]byte("re: "), m.Plaintext...)); err != nil {
		t.Fatal(err)
	}
	if r := recvT(t, alice); string(r.Plaintext) != "re: ping" || r.Recipient != sess.Pubkey() {
		t.Fatalf("%+v", r)
	}
}

// A member connection (plain hello) resumes by member key and sessionId
// once the broker has seen its old socket close.
func TestGoClientReconnectMemberHello(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(20*time.Second))
	f := b.fixture()
	p := newProxy(t, b)
	bob := b.connect(f.b, client.Options{})
	alice, acks, drops := reconnecting(t, b, p, f.a, client.Options{SessionID: "alice-daemon"})
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	p.refuse.Store(true)
	p.cut()
	waitAck(t, drops, "OnDisconnect")
	b.waitOffline(alice.HelloAck.PresenceID)
	p.refuse.Store(false)
	if a := waitAck(t, acks, "OnReconnect"); a.PresenceID != alice.HelloAck.PresenceID {
		t.Fatalf("new presence %s, want %s", a.PresenceID, alice.HelloAck.PresenceID)
	}
	if _, err := bob.SendDirect(ctxT(t), pub(f.a.Key), client.PriorityNow, []byte("still there?")); err != nil {
		t.Fatal(err)
	}
	if m := recvT(t, alice); string(m.Plaintext) != "still there?" || m.Recipient != f.a.Pubkey() {
		t.Fatalf("%+v", m)
	}
	if got := collect(bob, 100*time.Millisecond, func(fr client.Frame) bool {
		return isEvent("peer_left")(fr) || isEvent("peer_joined")(fr) || isEvent("peer_returned")(fr)
	}); len(got) != 0 {
		t.Fatalf("the observer saw the outage: %s", got[0].Raw)
	}
}

// An outage longer than the lease: the broker has evicted the presence, so
// the stale token is ignored, the hello is judged on its own, and the
// client carries on as a new presence.
func TestGoClientReconnectAfterLeaseExpiry(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(200*time.Millisecond))
	f := b.fixture()
	p := newProxy(t, b)
	bob := b.connect(f.b, client.Options{})
	sess := client.NewSession()
	alice, acks, drops := reconnecting(t, b, p, f.a, client.Options{Session: &sess})
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	p.refuse.Store(true)
	p.cut()
	waitAck(t, drops, "OnDisconnect")
	waitFrame(t, bob, 10*time.Second, func(fr client.Frame) bool {
		return isEvent("peer_left")(fr) && strings.Contains(string(fr.Raw), sess.Pubkey())
	})
	p.refuse.Store(false)
	a := waitAck(t, acks, "OnReconnect")
	if a.PresenceID == "" || a.PresenceID == alice.HelloAck.PresenceID || a.ResumeToken == "" {
		t.Fatalf("ack after expiry %+v", a)
	}
	waitFrame(t, bob, 10*time.Second, func(fr client.Frame) bool {
		return (isEvent("peer_joined")(fr) || isEvent("peer_returned")(fr)) && strings.Contains(string(fr.Raw), sess.Pubkey())
	})
	if _, err := bob.SendDirect(ctxT(t), pub(sess.Key), client.PriorityNow, []byte("welcome back")); err != nil {
		t.Fatal(err)
	}
	if m := recvT(t, alice); string(m.Plaintext) != "welcome back" {
		t.Fatalf("%+v", m)
	}
}

// A half-open drop: the client's socket fails while the broker still
// believes the old one is online. The reconnect's token (bound to the
// member key its hello proved) takes that lease over, for a member hello
// as for a session: same presence, nothing at the observer.
func TestGoClientReconnectTakesOverHalfOpenLease(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(20*time.Second))
	f := b.fixture()
	p := newProxy(t, b)
	bob := b.connect(f.b, client.Options{})
	sess := client.NewSession()
	member, macks, _ := reconnecting(t, b, p, f.a, client.Options{SessionID: "alice-daemon"})
	session, sacks, _ := reconnecting(t, b, p, f.c, client.Options{Session: &sess})
	for range 2 {
		waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	}
	p.cutClientSide()
	for _, tc := range []struct {
		c    *client.Client
		acks chan protocol.HelloAck
	}{{member, macks}, {session, sacks}} {
		if a := waitAck(t, tc.acks, "OnReconnect"); a.PresenceID != tc.c.HelloAck.PresenceID {
			t.Fatalf("%s: new presence %s, want %s", tc.c.ID.DisplayName, a.PresenceID, tc.c.HelloAck.PresenceID)
		}
	}
	for _, tc := range []struct {
		c   *client.Client
		key []byte
	}{{member, pub(f.a.Key)}, {session, pub(sess.Key)}} {
		if _, err := bob.SendDirect(ctxT(t), tc.key, client.PriorityNow, []byte("hello "+tc.c.ID.DisplayName)); err != nil {
			t.Fatal(err)
		}
		if m := recvT(t, tc.c); string(m.Plaintext) != "hello "+tc.c.ID.DisplayName {
			t.Fatalf("%+v", m)
		}
	}
	if got := collect(bob, 100*time.Millisecond, func(fr client.Frame) bool {
		return isEvent("peer_left")(fr) || isEvent("peer_joined")(fr) || isEvent("peer_returned")(fr)
	}); len(got) != 0 {
		t.Fatalf("the observer saw the outage: %s", got[0].Raw)
	}
}
