package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// End-to-end tests of the real-time extras (04 §2-§9 with R1-R3): URL
// watches, streams, the peer-hosted MCP registry, the mesh clock and shared
// state, over real sockets against a real broker. The emphasis is lifetime:
// each feature's state survives a silent reattach inside the lease and is
// cleaned exactly once at eviction, also when the presence is kicked or
// replaced by a same-session-id hello.
//
// Watch checks run on the watch's own timer (5 s at the least, R2), so the
// tests trigger checks through the ForTest hook instead of waiting; the
// clock runs at speed 100 (a tick every 600 ms).

// rtRec records every unsolicited frame of a client, so a test can wait for
// one and also prove that a frame never came.
type rtRec struct {
	t      *testing.T
	c      *client.Client
	mu     sync.Mutex
	frames []client.Frame
	used   []bool
	done   chan struct{}
}

func rtRecord(t *testing.T, c *client.Client) *rtRec {
	t.Helper()
	r := &rtRec{t: t, c: c, done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		defer close(r.done)
		for {
			f, err := c.Next(ctx)
			if err != nil {
				return
			}
			r.mu.Lock()
			r.frames = append(r.frames, f)
			r.used = append(r.used, false)
			r.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-r.done })
	return r
}

// wait returns the first frame not returned before that matches.
func (r *rtRec) wait(timeout time.Duration, what string, match func(client.Frame) bool) client.Frame {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		r.mu.Lock()
		for i, f := range r.frames {
			if !r.used[i] && match(f) {
				r.used[i] = true
				r.mu.Unlock()
				return f
			}
		}
		r.mu.Unlock()
		if time.Now().After(deadline) {
			r.t.Fatalf("%s (%s): no %s within %v", r.c.ID.DisplayName, r.c.HelloAck.PresenceID[:6], what, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// none waits d, then fails if a frame not returned before matches.
func (r *rtRec) none(d time.Duration, what string, match func(client.Frame) bool) {
	r.t.Helper()
	time.Sleep(d)
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, f := range r.frames {
		if !r.used[i] && match(f) {
			r.t.Fatalf("%s: unexpected %s: %s", r.c.ID.DisplayName, what, f.Raw)
		}
	}
}

// drain marks every frame received so far as seen.
func (r *rtRec) drain() {
	r.mu.Lock()
	for i := range r.used {
		r.used[i] = true
	}
	r.mu.Unlock()
}

func rtType(typ string) func(client.Frame) bool {
	return func(f client.Frame) bool { return f.Type == typ }
}

// rtEventAbout matches a system push of event whose eventData has
// serverName (MCP events) or watchId equal to about.
func rtEventAbout(event, about string) func(client.Frame) bool {
	return func(f client.Frame) bool {
		if !isEvent(event)(f) {
			return false
		}
		var p pushEvent
		_ = f.Decode(&p)
		var d struct{ ServerName, WatchID string }
		_ = json.Unmarshal(p.EventData, &d)
		return d.ServerName == about || d.WatchID == about
	}
}

func rtReqIDIs(id string) func(client.Frame) bool {
	return func(f client.Frame) bool {
		var h struct {
			ReqID string `json:"_reqId"`
		}
		_ = f.Decode(&h)
		return h.ReqID == id
	}
}

// rtDo sends a request and returns its reply, failing on an error frame.
func rtDo(t *testing.T, c *client.Client, frame map[string]any) client.Frame {
	t.Helper()
	f, err := c.Request(ctxT(t), frame)
	if err != nil {
		t.Fatalf("%s %v: %v", c.ID.DisplayName, frame["type"], err)
	}
	return f
}

// rtFail sends a request that must be answered by an error frame with code.
func rtFail(t *testing.T, c *client.Client, frame map[string]any, code string) string {
	t.Helper()
	f, err := c.Request(ctxT(t), frame)
	var er *client.ErrorReply
	if !errors.As(err, &er) {
		t.Fatalf("%s: want error %s, got %s (%v)", frame["type"], code, f.Raw, err)
	}
	if er.Code != code {
		t.Fatalf("%s: error code %q (%s), want %q", frame["type"], er.Code, er.Message, code)
	}
	return er.Message
}

// rtSend writes a frame that gets no reply.
func rtSend(t *testing.T, c *client.Client, frame map[string]any) {
	t.Helper()
	if err := c.WriteJSON(frame); err != nil {
		t.Fatal(err)
	}
}

func rtDecode[T any](t *testing.T, f client.Frame) T {
	t.Helper()
	var v T
	if err := f.Decode(&v); err != nil {
		t.Fatalf("decode %s: %v", f.Raw, err)
	}
	return v
}

func rtEventData[T any](t *testing.T, f client.Frame) T {
	t.Helper()
	return rtDecodeRaw[T](t, decodePush(t, f).EventData)
}

func rtDecodeRaw[T any](t *testing.T, raw json.RawMessage) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatalf("decode %s: %v", raw, err)
	}
	return v
}

func rtSameJSON(t *testing.T, got json.RawMessage, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("bad JSON %s", got)
	}
	_ = json.Unmarshal([]byte(want), &w)
	if fmt.Sprint(g) != fmt.Sprint(w) {
		t.Fatalf("JSON %s, want %s", got, want)
	}
}

// rtWaitGrace waits until the broker has seen the socket close: the
// presence is still registered but offline.
func rtWaitGrace(t *testing.T, b *testBroker, presenceID string) {
	t.Helper()
	waitFor(t, 10*time.Second, "grace of "+presenceID[:6], func() bool {
		c := b.presence.Get(presenceID)
		return c != nil && !b.presence.Online(c)
	})
}

func rtWaitEvicted(t *testing.T, b *testBroker, presenceID string) {
	t.Helper()
	waitFor(t, 10*time.Second, "eviction of "+presenceID[:6], func() bool { return b.presence.Get(presenceID) == nil })
}

func rtAuditCount(b *testBroker, meshID, event, actor string) int64 {
	var n int64
	b.query(&n, "SELECT count(*) FROM {audit_log} WHERE mesh_id = ? AND event_type = ? AND actor_member_id = ?", meshID, event, actor)
	return n
}

// rtTarget is an HTTP server a watch polls; tests change what it answers.
type rtTarget struct {
	srv    *httptest.Server
	hits   atomic.Int64
	mu     sync.Mutex
	status int
	body   string
}

func rtServe(t *testing.T, status int, body string) *rtTarget {
	t.Helper()
	s := &rtTarget{status: status, body: body}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		s.hits.Add(1)
		s.mu.Lock()
		status, body := s.status, s.body
		s.mu.Unlock()
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *rtTarget) set(status int, body string) {
	s.mu.Lock()
	s.status, s.body = status, body
	s.mu.Unlock()
}

func (s *rtTarget) url() string { return s.srv.URL + "/" }

func rtHash16(body string) string {
	sum := sha256.Sum256([]byte(body))
	return hex.EncodeToString(sum[:8])
}

// rtWatchList returns the caller's watches by id.
func rtWatchList(t *testing.T, c *client.Client) map[string]protocol.WatchInfo {
	t.Helper()
	res := rtDecode[protocol.WatchListResult](t, rtDo(t, c, map[string]any{"type": "watch_list"}))
	out := map[string]protocol.WatchInfo{}
	for _, w := range res.Watches {
		out[w.ID] = w
	}
	return out
}

// rtBaseline waits for the watch's first successful check.
func rtBaseline(t *testing.T, c *client.Client, id string) protocol.WatchInfo {
	t.Helper()
	var w protocol.WatchInfo
	waitFor(t, 10*time.Second, "baseline of "+id, func() bool {
		w = rtWatchList(t, c)[id]
		return w.LastCheck != ""
	})
	return w
}

func rtStreams(t *testing.T, c *client.Client) map[string]protocol.StreamInfo {
	t.Helper()
	res := rtDecode[protocol.StreamList](t, rtDo(t, c, map[string]any{"type": "list_streams"}))
	out := map[string]protocol.StreamInfo{}
	for _, s := range res.Streams {
		out[s.Name] = s
	}
	return out
}

func rtMCPList(t *testing.T, c *client.Client) []protocol.MCPServerInfo {
	t.Helper()
	return rtDecode[protocol.MCPListResult](t, rtDo(t, c, map[string]any{"type": "mcp_list"})).Servers
}

func rtMCPFind(list []protocol.MCPServerInfo, name string) *protocol.MCPServerInfo {
	for i := range list {
		if list[i].Name == name {
			return &list[i]
		}
	}
	return nil
}

func rtRegister(t *testing.T, c *client.Client, name string, persistent bool) {
	t.Helper()
	rtDo(t, c, map[string]any{"type": "mcp_register", "serverName": name, "description": name + " tools",
		"tools": []any{map[string]any{"name": "echo", "description": "echoes", "inputSchema": map[string]any{}}}, "persistent": persistent})
}

// rtCall is an mcp_call in flight; its reply arrives on done.
type rtCall struct {
	done chan client.Frame
	err  chan error
}

func rtCallAsync(c *client.Client, server string, args any) *rtCall {
	call := &rtCall{done: make(chan client.Frame, 1), err: make(chan error, 1)}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		frame := map[string]any{"type": "mcp_call", "serverName": server, "toolName": "echo"}
		if args != nil {
			frame["args"] = args
		}
		f, err := c.Request(ctx, frame)
		if err != nil {
			call.err <- err
			return
		}
		call.done <- f
	}()
	return call
}

func (c *rtCall) result(t *testing.T, within time.Duration) protocol.MCPCallResult {
	t.Helper()
	select {
	case f := <-c.done:
		if f.Type != "mcp_call_result" {
			t.Fatalf("mcp_call answered %s", f.Raw)
		}
		return rtDecode[protocol.MCPCallResult](t, f)
	case err := <-c.err:
		t.Fatalf("mcp_call: %v", err)
	case <-time.After(within):
		t.Fatalf("no mcp_call_result within %v", within)
	}
	panic("unreachable")
}

func rtCallNow(t *testing.T, c *client.Client, server string) protocol.MCPCallResult {
	t.Helper()
	return rtCallAsync(c, server, map[string]any{}).result(t, 10*time.Second)
}

// rtAnswer waits for a forwarded call at the host and answers it.
func rtAnswer(t *testing.T, host *client.Client, rec *rtRec, server string, answer map[string]any) protocol.MCPCallForward {
	t.Helper()
	fwd := rtDecode[protocol.MCPCallForward](t, rec.wait(10*time.Second, "mcp_call_forward for "+server, func(f client.Frame) bool {
		var fw protocol.MCPCallForward
		return f.Type == "mcp_call_forward" && f.Decode(&fw) == nil && fw.ServerName == server
	}))
	answer["type"], answer["callId"] = "mcp_call_response", fwd.CallID
	rtSend(t, host, answer)
	return fwd
}

func rtClock(t *testing.T, c *client.Client, frame map[string]any) protocol.ClockStatus {
	t.Helper()
	return rtDecode[protocol.ClockStatus](t, rtDo(t, c, frame))
}

var uuidV4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// 04 §9 scenarios 8-12: A owns a watch, a subscription and two MCP servers
// and the clock runs; A's socket drops and A reattaches inside the lease.
// Nothing is cleaned up, nobody hears of it, and during the outage A's
// frames are dropped, not replayed.
func TestRealtimeReattachKeepsEverything(t *testing.T) {
	t.Parallel()
	// The reattach must land inside the lease, after a dozen requests.
	b := startTestBroker(t, func(c *config.Config) { c.WatchAllowPrivate, c.LeaseTTL = true, 30*time.Second })
	f := b.fixture()
	target := rtServe(t, 200, "v1")
	sess := client.NewSession()
	a := b.connect(f.a, client.Options{Session: &sess, SessionID: "a1"})
	bob := b.connect(f.b, client.Options{SessionID: "b1"})
	br := rtRecord(t, bob)
	pid := a.HelloAck.PresenceID

	w := rtDecode[protocol.WatchAck](t, rtDo(t, a, map[string]any{"type": "watch", "url": target.url(), "interval": 3600}))
	base := rtBaseline(t, a, w.WatchID)
	rtDo(t, bob, map[string]any{"type": "create_stream", "name": "S"})
	rtDo(t, a, map[string]any{"type": "subscribe", "stream": "S"})
	rtRegister(t, a, "X", false)
	rtRegister(t, a, "Y", true)
	br.wait(10*time.Second, "mcp_registered Y", rtEventAbout("mcp_registered", "Y"))
	rtClock(t, a, map[string]any{"type": "set_clock", "speed": 100})

	a.Kill()
	rtWaitGrace(t, b, pid)
	br.drain()

	// 9: the watch keeps polling; a change now is noticed but lost.
	target.set(200, "v2")
	if !b.realtime.ForTest().CheckWatch(w.WatchID) {
		t.Fatal("watch gone during grace")
	}
	// 10: the subscription stays; data published now is not kept for A.
	rtSend(t, bob, map[string]any{"type": "publish", "stream": "S", "data": "during"})
	if n := rtStreams(t, bob)["S"].SubscriberCount; n != 1 {
		t.Fatalf("subscriberCount during grace = %d", n)
	}
	// 11: both servers stay online; a call fails at once (R3).
	for _, s := range rtMCPList(t, bob) {
		if !s.Online {
			t.Fatalf("%s offline during grace", s.Name)
		}
	}
	start := time.Now()
	if res := rtCallNow(t, bob, "X"); !strings.HasPrefix(res.Error, "host_unavailable") || time.Since(start) > 10*time.Second { // not the 30 s call timeout
		t.Fatalf("call during grace: %+v after %v", res, time.Since(start))
	}
	// 12: the clock keeps ticking.
	tk := rtEventData[protocol.Tick](t, br.wait(10*time.Second, "tick during grace", isEvent("tick")))
	if st := b.realtime.GetClock(&services.Conn{MeshID: f.meshID}); st.Paused || st.Tick < tk.Tick {
		t.Fatalf("clock during grace: %+v", st)
	}

	a2 := b.connect(f.a, client.Options{Session: &sess, SessionID: "a1"})
	if a2.HelloAck.PresenceID != pid {
		t.Fatalf("reattach gave presence %s, want %s", a2.HelloAck.PresenceID, pid)
	}
	ar := rtRecord(t, a2)

	got := rtWatchList(t, a2)[w.WatchID]
	if got.ID != w.WatchID || got.LastValue != rtHash16("v2") || got.LastCheck <= base.LastCheck {
		t.Fatalf("watch after reattach: %+v (baseline %+v)", got, base)
	}
	rtSend(t, bob, map[string]any{"type": "publish", "stream": "S", "data": "after"})
	sd := rtDecode[protocol.StreamData](t, ar.wait(10*time.Second, "stream_data", rtType("stream_data")))
	if string(sd.Data) != `"after"` {
		t.Fatalf("first stream_data after reattach carries %s, want the post-reattach publish", sd.Data)
	}
	call := rtCallAsync(bob, "X", map[string]any{"q": 1})
	rtAnswer(t, a2, ar, "X", map[string]any{"result": 42})
	if res := call.result(t, 10*time.Second); string(res.Result) != "42" || res.Error != "" {
		t.Fatalf("call after reattach: %+v", res)
	}
	ar.wait(10*time.Second, "tick after reattach", isEvent("tick"))
	if st := rtClock(t, a2, map[string]any{"type": "get_clock"}); st.Paused {
		t.Fatal("clock paused by a reattach")
	}
	ar.none(100*time.Millisecond, "watch_triggered for the outage", isEvent("watch_triggered"))

	// 8: no trace of the outage for B, nor in the audit log.
	for _, ev := range []string{"peer_left", "peer_joined", "mcp_unregistered", "mcp_restored"} {
		br.none(0, ev, isEvent(ev))
	}
	if n := rtAuditCount(b, f.meshID, "peer_left", f.a.MemberID); n != 0 {
		t.Fatalf("%d peer_left audit rows after a reattach", n)
	}
	waitFor(t, 10*time.Second, "A's one peer_joined row", func() bool { return rtAuditCount(b, f.meshID, "peer_joined", f.a.MemberID) == 1 })
}

// 04 §9 scenarios 13-18: A does not come back. Eviction cleans each
// feature once, silently; A's persistent server waits offline and returns
// with A's next member hello, not with a session hello.
func TestRealtimeEvictionCleansUpOnce(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.WatchAllowPrivate, c.LeaseTTL = true, 300*time.Millisecond })
	f := b.fixture()
	target := rtServe(t, 200, "v1")
	a := b.connect(f.a, client.Options{SessionID: "a1"})
	bob := b.connect(f.b, client.Options{SessionID: "b1"})
	br := rtRecord(t, bob)
	pid := a.HelloAck.PresenceID

	w := rtDecode[protocol.WatchAck](t, rtDo(t, a, map[string]any{"type": "watch", "url": target.url(), "interval": 3600}))
	rtBaseline(t, a, w.WatchID)
	rtDo(t, a, map[string]any{"type": "create_stream", "name": "S"})
	rtDo(t, a, map[string]any{"type": "subscribe", "stream": "S"})
	rtDo(t, bob, map[string]any{"type": "subscribe", "stream": "S"})
	rtRegister(t, a, "X", false)
	rtRegister(t, a, "Y", true)
	rtClock(t, a, map[string]any{"type": "set_clock", "speed": 100})

	a.Kill()
	evictedAt := time.Now()
	br.wait(10*time.Second, "peer_left", isEvent("peer_left"))
	rtWaitEvicted(t, b, pid)

	// 13: one peer_left row, payload {}, actor A's member.
	waitFor(t, 10*time.Second, "peer_left audit row", func() bool { return rtAuditCount(b, f.meshID, "peer_left", f.a.MemberID) == 1 })
	var payload []string
	b.query(&payload, "SELECT payload FROM {audit_log} WHERE mesh_id = ? AND event_type = 'peer_left'", f.meshID)
	if len(payload) != 1 || strings.ReplaceAll(payload[0], " ", "") != "{}" {
		t.Fatalf("peer_left payloads %q", payload)
	}
	// 14: the watch is gone; S lost one subscriber and is still listed. The
	// cleanups run after the presence leaves the registry, so wait for them.
	waitFor(t, 10*time.Second, "watch removed by the eviction", func() bool { return !b.realtime.ForTest().CheckWatch(w.WatchID) })
	hits := target.hits.Load()
	if target.hits.Load() != hits {
		t.Fatal("evicted watch polled its target")
	}
	if s, ok := rtStreams(t, bob)["S"]; !ok || s.SubscriberCount != 1 {
		t.Fatalf("S after eviction: %+v %v", s, ok)
	}
	// 15: X vanished, Y is offline; nobody was told.
	list := rtMCPList(t, bob)
	y := rtMCPFind(list, "Y")
	if len(list) != 1 || y == nil || y.Online || y.OfflineSince == "" {
		t.Fatalf("mcp_list after eviction: %+v", list)
	}
	if since, err := time.Parse(protocol.ISOLayout, y.OfflineSince); err != nil || since.Sub(evictedAt) > 10*time.Second || since.Before(evictedAt) {
		t.Fatalf("offlineSince %s, socket killed at %s", y.OfflineSince, evictedAt.UTC().Format(protocol.ISOLayout))
	}
	br.none(0, "mcp_unregistered", isEvent("mcp_unregistered"))
	if res := rtCallNow(t, bob, "Y"); !strings.HasPrefix(res.Error, "Server 'Y' is offline — hosted by alice who disconnected ") ||
		!strings.HasSuffix(res.Error, "s ago. It will restore when they reconnect.") {
		t.Fatalf("call Y: %q", res.Error)
	}
	if res := rtCallNow(t, bob, "X"); res.Error != `MCP server "X" not found in mesh` {
		t.Fatalf("call X: %q", res.Error)
	}
	// 16: B is still here, so the clock keeps ticking.
	br.drain()
	br.wait(10*time.Second, "tick after A's eviction", isEvent("tick"))

	// 18: a session hello of A's member does not restore Y.
	sess := client.NewSession()
	as := b.connect(f.a, client.Options{Session: &sess, SessionID: "as"})
	asr := rtRecord(t, as)
	if y := rtMCPFind(rtMCPList(t, bob), "Y"); y == nil || y.Online {
		t.Fatalf("Y after a session hello: %+v", y)
	}
	asr.none(100*time.Millisecond, "mcp_restored", isEvent("mcp_restored"))

	// 17: A's next member hello is a new presence and restores Y for all.
	a2 := b.connect(f.a, client.Options{SessionID: "a2", DisplayName: "alice-again"})
	ar := rtRecord(t, a2)
	if a2.HelloAck.PresenceID == pid {
		t.Fatal("a fresh hello reused the evicted presence")
	}
	for _, r := range []*rtRec{ar, br, asr} {
		ev := rtEventData[protocol.MCPHostEvent](t, r.wait(10*time.Second, "mcp_restored", rtEventAbout("mcp_restored", "Y")))
		if ev.HostedBy != "alice-again" {
			t.Fatalf("mcp_restored hostedBy %q", ev.HostedBy)
		}
	}
	br.wait(10*time.Second, "peer_joined", isEvent("peer_joined"))
	if y := rtMCPFind(rtMCPList(t, bob), "Y"); y == nil || !y.Online || y.OfflineSince != "" || y.HostedBy != "alice-again" {
		t.Fatalf("Y after return: %+v", y)
	}
	call := rtCallAsync(bob, "Y", nil)
	fwd := rtAnswer(t, a2, ar, "Y", map[string]any{"result": "back"})
	if fwd.Args != nil {
		t.Fatalf("args forwarded although the call had none: %s", fwd.Args)
	}
	if res := call.result(t, 10*time.Second); string(res.Result) != `"back"` {
		t.Fatalf("call after return: %+v", res)
	}
	if len(rtWatchList(t, a2)) != 0 {
		t.Fatal("watches came back with a new presence")
	}
	if n := rtStreams(t, a2)["S"].SubscriberCount; n != 1 {
		t.Fatalf("subscriberCount %d: A's subscription came back", n)
	}
	if n := rtAuditCount(b, f.meshID, "peer_left", f.a.MemberID); n != 1 {
		t.Fatalf("%d peer_left rows, want exactly one", n)
	}
}

// 04 §9 scenario 16 and §2 step 8: the clock pauses when the last presence
// of the mesh is evicted (a presence in grace still counts), and stays
// paused until resume_clock.
func TestClockAutoPausesWhenMeshEmpties(t *testing.T) {
	t.Parallel()
	// Several ticks (600 ms at speed 100) long, so a tick is seen while A
	// is in grace.
	b := startTestBroker(t, func(c *config.Config) { c.LeaseTTL = 3 * time.Second })
	f := b.fixture()
	a := b.connect(f.a, client.Options{SessionID: "a1"})
	bob := b.connect(f.b, client.Options{SessionID: "b1"})
	ar := rtRecord(t, a)
	rtClock(t, a, map[string]any{"type": "set_clock", "speed": 100})
	mesh := &services.Conn{MeshID: f.meshID}

	bob.Kill()
	rtWaitEvicted(t, b, bob.HelloAck.PresenceID)
	ar.drain()
	ar.wait(10*time.Second, "tick with A alone", isEvent("tick"))

	a.Kill()
	rtWaitGrace(t, b, a.HelloAck.PresenceID)
	t0 := b.realtime.GetClock(mesh).Tick
	waitFor(t, 10*time.Second, "ticks while A is in grace", func() bool {
		st := b.realtime.GetClock(mesh)
		return !st.Paused && st.Tick > t0
	})
	rtWaitEvicted(t, b, a.HelloAck.PresenceID)
	waitFor(t, 10*time.Second, "auto-pause", func() bool { return b.realtime.GetClock(mesh).Paused })
	paused := b.realtime.GetClock(mesh)
	time.Sleep(800 * time.Millisecond)
	if st := b.realtime.GetClock(mesh); st.Tick != paused.Tick {
		t.Fatalf("ticks after auto-pause: %d -> %d", paused.Tick, st.Tick)
	}

	carol := b.connect(f.c, client.Options{})
	cr := rtRecord(t, carol)
	if st := rtClock(t, carol, map[string]any{"type": "get_clock"}); !st.Paused || st.Speed != 100 || st.Tick != paused.Tick {
		t.Fatalf("get_clock after auto-pause: %+v", st)
	}
	cr.none(800*time.Millisecond, "tick while paused", isEvent("tick"))
	if st := rtClock(t, carol, map[string]any{"type": "resume_clock"}); st.Paused {
		t.Fatalf("resume_clock: %+v", st)
	}
	tk := rtEventData[protocol.Tick](t, cr.wait(10*time.Second, "tick after resume", isEvent("tick")))
	if tk.Tick != paused.Tick+1 {
		t.Fatalf("tick %d after resume, want %d", tk.Tick, paused.Tick+1)
	}
}

// 04 §9 scenario 19 and R1: kick and session-id dedup remove a presence
// without grace; its watches, subscriptions and MCP entries are cleaned as
// at eviction, and the calls it was hosting fail at once.
func TestRealtimeCleanupOnKickAndDedup(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.WatchAllowPrivate, c.LeaseTTL = true, 10*time.Second })
	f := b.fixture()
	target := rtServe(t, 200, "v1")
	alice := b.connect(f.a, client.Options{SessionID: "a1"})
	ar := rtRecord(t, alice)
	sess := client.NewSession()
	bob := b.connect(f.b, client.Options{Session: &sess, SessionID: "b1"}) // kick spares control-plane sockets
	br := rtRecord(t, bob)
	rtDo(t, alice, map[string]any{"type": "create_stream", "name": "S"})

	w := rtDecode[protocol.WatchAck](t, rtDo(t, bob, map[string]any{"type": "watch", "url": target.url(), "interval": 3600}))
	rtDo(t, bob, map[string]any{"type": "subscribe", "stream": "S"})
	rtRegister(t, bob, "X", false)
	rtRegister(t, bob, "Y", true)
	pending := rtCallAsync(alice, "X", map[string]any{"slow": true})
	br.wait(10*time.Second, "forward of the pending call", rtType("mcp_call_forward"))

	kick := rtDecode[protocol.ModerationAck](t, rtDo(t, alice, map[string]any{"type": "kick", "target": "bob"}))
	if len(kick.Kicked) != 1 {
		t.Fatalf("kick_ack %+v", kick)
	}
	if res := pending.result(t, 10*time.Second); res.Error != `MCP server "X" host disconnected` {
		t.Fatalf("pending call after kick: %+v", res)
	}
	if b.realtime.ForTest().HasWatch(w.WatchID) {
		t.Fatal("kicked presence's watch still polls")
	}
	if n := rtStreams(t, alice)["S"].SubscriberCount; n != 0 {
		t.Fatalf("subscriberCount %d after kick", n)
	}
	list := rtMCPList(t, alice)
	if y := rtMCPFind(list, "Y"); len(list) != 1 || y == nil || y.Online {
		t.Fatalf("mcp_list after kick: %+v", list)
	}

	// Dedup: carol's second member hello with the same session id while
	// the first socket is still open.
	carol := b.connect(f.c, client.Options{SessionID: "c1"})
	w2 := rtDecode[protocol.WatchAck](t, rtDo(t, carol, map[string]any{"type": "watch", "url": target.url(), "interval": 3600}))
	rtDo(t, carol, map[string]any{"type": "subscribe", "stream": "S"})
	rtRegister(t, carol, "Z", true)
	ar.wait(10*time.Second, "mcp_registered Z", rtEventAbout("mcp_registered", "Z"))
	carol2 := b.connect(f.c, client.Options{SessionID: "c1"})
	c2r := rtRecord(t, carol2)
	select {
	case <-carol.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("replaced socket not closed")
	}
	if b.realtime.ForTest().HasWatch(w2.WatchID) {
		t.Fatal("replaced presence's watch still polls")
	}
	if n := rtStreams(t, alice)["S"].SubscriberCount; n != 0 {
		t.Fatalf("subscriberCount %d after dedup", n)
	}
	// Z went offline with the old presence and came back with the new one.
	c2r.wait(10*time.Second, "mcp_restored Z", rtEventAbout("mcp_restored", "Z"))
	ar.wait(10*time.Second, "mcp_restored Z", rtEventAbout("mcp_restored", "Z"))
	call := rtCallAsync(alice, "Z", nil)
	rtAnswer(t, carol2, c2r, "Z", map[string]any{"result": true})
	if res := call.result(t, 10*time.Second); string(res.Result) != "true" {
		t.Fatalf("call Z after dedup: %+v", res)
	}
	ar.none(0, "mcp_unregistered", isEvent("mcp_unregistered"))
}

// 04 §9 scenarios 20-24.
func TestWatches(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.WatchAllowPrivate = true })
	f := b.fixture()
	sa, sa2 := client.NewSession(), client.NewSession()
	a := b.connect(f.a, client.Options{Session: &sa})
	a2 := b.connect(f.a, client.Options{Session: &sa2})
	bob := b.connect(f.b, client.Options{})
	ar, a2r, br := rtRecord(t, a), rtRecord(t, a2), rtRecord(t, bob)
	check := b.realtime.ForTest().CheckWatch
	watch := func(frame map[string]any) protocol.WatchAck {
		t.Helper()
		frame["type"] = "watch"
		return rtDecode[protocol.WatchAck](t, rtDo(t, a, frame))
	}
	triggered := func(id string) protocol.WatchTriggered {
		t.Helper()
		return rtEventData[protocol.WatchTriggered](t, ar.wait(10*time.Second, "watch_triggered "+id, rtEventAbout("watch_triggered", id)))
	}

	// 20: defaults and clamps.
	plain := rtServe(t, 200, "v1")
	idPattern := regexp.MustCompile(`^w_[0-9a-f]{8}$`)
	for _, tt := range []struct {
		interval any
		want     float64
	}{{1, 5}, {nil, 30}, {"soon", 30}, {7.5, 7.5}, {1e9, 86400}} {
		frame := map[string]any{"url": plain.url()}
		if tt.interval != nil {
			frame["interval"] = tt.interval
		}
		ack := watch(frame)
		if ack.Interval != tt.want || ack.Mode != "hash" || ack.URL != plain.url() || !idPattern.MatchString(ack.WatchID) {
			t.Fatalf("interval %v: ack %+v", tt.interval, ack)
		}
		if un := rtDecode[protocol.WatchAck](t, rtDo(t, a, map[string]any{"type": "unwatch", "watchId": ack.WatchID})); un.URL != plain.url() || un.Interval != 0 {
			t.Fatalf("unwatch: %+v", un)
		}
	}

	// 21: hash mode; the baseline never notifies, a change notifies the
	// owner presence only.
	h := watch(map[string]any{"url": plain.url(), "interval": 3600, "label": "site"})
	rtBaseline(t, a, h.WatchID)
	plain.set(200, "v2")
	check(h.WatchID)
	p := decodePush(t, ar.wait(10*time.Second, "watch_triggered", rtEventAbout("watch_triggered", h.WatchID)))
	ev := rtDecodeRaw[protocol.WatchTriggered](t, p.EventData)
	if p.Priority != "now" || p.SenderPubkey != "system" || ev.OldValue != rtHash16("v1") || ev.NewValue != rtHash16("v2") ||
		ev.Mode != "hash" || ev.URL != plain.url() || ev.Label == nil || *ev.Label != "site" {
		t.Fatalf("watch_triggered %+v %s", p, p.EventData)
	}
	check(h.WatchID) // unchanged: no push
	ar.none(100*time.Millisecond, "second watch_triggered", isEvent("watch_triggered"))
	a2r.none(0, "watch_triggered at a sibling session", isEvent("watch_triggered"))
	br.none(0, "watch_triggered at another member", isEvent("watch_triggered"))

	// 22: json mode with an extract path, and the notify_on triggers.
	js := rtServe(t, 200, `{"status":"ok","n":[1,{"v":2.50}]}`)
	ids := map[string]string{}
	for _, on := range []string{"change", "match:ok", "not_match:ok", "always"} {
		ids[on] = watch(map[string]any{"url": js.url(), "mode": "json", "extract": "$.status", "notify_on": on, "interval": 3600}).WatchID
		rtBaseline(t, a, ids[on])
	}
	deep := watch(map[string]any{"url": js.url(), "mode": "json", "extract": "$.n.1.v", "interval": 3600}).WatchID
	if got := rtBaseline(t, a, deep).LastValue; got != "2.5" {
		t.Fatalf("extract $.n.1.v = %q", got)
	}
	step := func(body string, fire ...string) {
		t.Helper()
		js.set(200, body)
		for _, id := range ids {
			check(id)
		}
		for _, on := range fire {
			ev := triggered(ids[on])
			if ev.Mode != "json" {
				t.Fatalf("%s: %+v", on, ev)
			}
		}
		ar.none(100*time.Millisecond, "other watch_triggered", isEvent("watch_triggered"))
	}
	step(`{"status":"fail"}`, "change", "not_match:ok")
	step(`{"status":"fail","x":1}`)
	step(`{"status":"ok"}`, "change", "match:ok")
	if got := rtWatchList(t, a)[ids["always"]].LastValue; got != "ok" {
		t.Fatalf("always-watch lastValue %q", got)
	}

	// 23: status mode; an unreachable URL never notifies and never checks.
	st := rtServe(t, 200, "")
	sw := watch(map[string]any{"url": st.url(), "mode": "status", "interval": 3600}).WatchID
	if got := rtBaseline(t, a, sw).LastValue; got != "200" {
		t.Fatalf("status baseline %q", got)
	}
	st.set(503, "")
	check(sw)
	if ev := triggered(sw); ev.OldValue != "200" || ev.NewValue != "503" {
		t.Fatalf("status trigger %+v", ev)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String() + "/"
	ln.Close()
	dw := watch(map[string]any{"url": dead, "mode": "status", "interval": 3600}).WatchID
	check(dw)
	check(dw)
	if got := rtWatchList(t, a)[dw]; got.LastCheck != "" || got.LastValue != "" {
		t.Fatalf("unreachable watch %+v", got)
	}
	raw := rtDo(t, a, map[string]any{"type": "watch_list"}).Raw
	if !strings.Contains(string(raw), `"id":"`+dw+`"`) || strings.Contains(string(raw), `"lastCheck":""`) {
		t.Fatalf("watch_list %s", raw)
	}

	// 24: unwatch of an unknown id, of another member's watch (R2), and by
	// the owner's sibling session; watch_list is per presence.
	un := rtDecode[protocol.WatchAck](t, rtDo(t, a, map[string]any{"type": "unwatch", "watchId": "w_00000000"}))
	if un.WatchID != "w_00000000" || un.URL != "" || un.Mode != "" || un.Interval != 0 || un.Type != "watch_ack" {
		t.Fatalf("unwatch unknown: %+v", un)
	}
	if un := rtDecode[protocol.WatchAck](t, rtDo(t, bob, map[string]any{"type": "unwatch", "watchId": h.WatchID})); un.URL != "" {
		t.Fatalf("bob unwatched alice's watch: %+v", un)
	}
	if len(rtWatchList(t, bob)) != 0 || len(rtWatchList(t, a2)) != 0 {
		t.Fatal("watch_list shows another presence's watches")
	}
	if un := rtDecode[protocol.WatchAck](t, rtDo(t, a2, map[string]any{"type": "unwatch", "watchId": h.WatchID})); un.URL != plain.url() || un.Mode != "hash" {
		t.Fatalf("sibling session could not unwatch: %+v", un)
	}
	if _, ok := rtWatchList(t, a)[h.WatchID]; ok {
		t.Fatal("unwatched watch still listed")
	}
}

// R2: without WATCH_ALLOW_PRIVATE a watch may not reach loopback, private,
// link-local or metadata addresses, by literal or by name; only http and
// https are watched. (A redirect to an internal address is refused by the
// dialer; services' internal tests cover it, as no public server is at hand.)
func TestWatchRefusesInternalTargets(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	target := rtServe(t, 200, "secret")
	a := b.connect(f.a, client.Options{})
	_, port, _ := net.SplitHostPort(target.srv.Listener.Addr().String())
	for _, u := range []string{
		target.url(),
		"http://localhost:" + port + "/",
		"http://169.254.169.254/latest/meta-data/",
		"http://[::1]:" + port + "/",
		"http://[::ffff:127.0.0.1]:" + port + "/",
		"http://10.1.2.3/", "http://192.168.0.1/", "http://172.16.0.1/",
		"http://100.100.100.200/", "http://[fd00:ec2::254]/", "http://[fe80::1]/", "https://0.0.0.0/",
		"http://[2002:a9fe:a9fe::]/latest/meta-data/", "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:" + port + "/", // 6to4, Teredo
		"http://[64:ff9b::a9fe:a9fe]/",
	} {
		if msg := rtFail(t, a, map[string]any{"type": "watch", "url": u}, "forbidden"); !strings.Contains(msg, "refused") {
			t.Fatalf("%s: %s", u, msg)
		}
	}
	for _, u := range []string{"ftp://example.com/", "file:///etc/passwd", "example.com", "http:///x", "javascript:alert(1)"} {
		rtFail(t, a, map[string]any{"type": "watch", "url": u}, "invalid_argument")
	}
	if n := target.hits.Load(); n != 0 {
		t.Fatalf("the internal target was fetched %d times", n)
	}
	if len(rtWatchList(t, a)) != 0 {
		t.Fatal("a refused watch was created")
	}
}

// R2: watches per member are capped.
func TestWatchCaps(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.WatchAllowPrivate = true })
	f := b.fixture()
	target := rtServe(t, 200, "x")
	a := b.connect(f.a, client.Options{})
	a2 := b.connect(f.a, client.Options{})
	for i := range 20 {
		c := a
		if i%2 == 1 {
			c = a2 // the cap counts the member's sessions together
		}
		rtDo(t, c, map[string]any{"type": "watch", "url": target.url(), "interval": 3600})
	}
	rtFail(t, a, map[string]any{"type": "watch", "url": target.url()}, "limit_exceeded")
	bob := b.connect(f.b, client.Options{})
	rtDo(t, bob, map[string]any{"type": "watch", "url": target.url(), "interval": 3600})
}

// 04 §9 scenarios 25-27.
func TestStreams(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	sa1, sa2 := client.NewSession(), client.NewSession()
	a1 := b.connect(f.a, client.Options{Session: &sa1, DisplayName: "alice-laptop"})
	a2 := b.connect(f.a, client.Options{Session: &sa2})
	bob := b.connect(f.b, client.Options{})
	a1r, a2r, br := rtRecord(t, a1), rtRecord(t, a2), rtRecord(t, bob)

	// 25: create_stream is idempotent; the first creator is kept.
	c1 := rtDecode[protocol.StreamCreated](t, rtDo(t, bob, map[string]any{"type": "create_stream", "name": "S"}))
	c2 := rtDecode[protocol.StreamCreated](t, rtDo(t, a1, map[string]any{"type": "create_stream", "name": "S"}))
	if c1.ID == "" || c1.ID != c2.ID || c2.Name != "S" || len(c1.ID) != 32 {
		t.Fatalf("create_stream twice: %+v %+v", c1, c2)
	}
	time.Sleep(2 * time.Millisecond)
	rtDo(t, a1, map[string]any{"type": "create_stream", "name": "T"})
	list := rtDecode[protocol.StreamList](t, rtDo(t, a1, map[string]any{"type": "list_streams"})).Streams
	if len(list) != 2 || list[0].Name != "S" || list[0].CreatedBy != "bob" || list[1].Name != "T" || list[1].CreatedBy != "alice" {
		t.Fatalf("list_streams %+v", list)
	}

	// 26: fan-out to every subscriber but the publishing presence.
	sub := rtDecode[protocol.Subscribed](t, rtDo(t, bob, map[string]any{"type": "subscribe", "stream": "S"}))
	if sub.Type != "subscribed" || sub.Stream != "S" || sub.ReqID == "" {
		t.Fatalf("subscribed %+v", sub)
	}
	rtDo(t, a1, map[string]any{"type": "subscribe", "stream": "S"})
	rtDo(t, a2, map[string]any{"type": "subscribe", "stream": "S"})
	rtDo(t, a2, map[string]any{"type": "subscribe", "stream": "S"}) // idempotent
	rtSend(t, a1, map[string]any{"type": "publish", "stream": "S", "data": map[string]any{"n": 1}, "_reqId": "pub1"})
	for _, r := range []*rtRec{br, a2r} {
		sd := rtDecode[protocol.StreamData](t, r.wait(10*time.Second, "stream_data", rtType("stream_data")))
		if sd.Stream != "S" || sd.PublishedBy != "alice" {
			t.Fatalf("stream_data %+v", sd)
		}
		rtSameJSON(t, sd.Data, `{"n":1}`)
	}
	if n := rtStreams(t, a1)["S"].SubscriberCount; n != 3 {
		t.Fatalf("subscriberCount %d", n)
	}
	a1r.none(0, "own stream_data", rtType("stream_data"))

	// Streams need not exist to be used, and are listed only if created.
	rtDo(t, bob, map[string]any{"type": "subscribe", "stream": "ghost"})
	rtSend(t, a1, map[string]any{"type": "publish", "stream": "ghost"})
	sd := br.wait(10*time.Second, "ghost stream_data", rtType("stream_data"))
	if strings.Contains(string(sd.Raw), `"data"`) {
		t.Fatalf("publish without data: %s", sd.Raw)
	}
	if _, ok := rtStreams(t, bob)["ghost"]; ok {
		t.Fatal("an uncreated stream is listed")
	}

	// 27: publish and unsubscribe never reply; no data after unsubscribe.
	rtSend(t, bob, map[string]any{"type": "unsubscribe", "stream": "S", "_reqId": "unsub1"})
	if n := rtStreams(t, bob)["S"].SubscriberCount; n != 2 { // frames of one socket are handled in order
		t.Fatalf("subscriberCount %d after unsubscribe", n)
	}
	rtSend(t, a1, map[string]any{"type": "publish", "stream": "S", "data": 2, "_reqId": "pub2"})
	if sd := rtDecode[protocol.StreamData](t, a2r.wait(10*time.Second, "stream_data 2", rtType("stream_data"))); string(sd.Data) != "2" {
		t.Fatalf("stream_data %+v", sd)
	}
	br.none(100*time.Millisecond, "stream_data after unsubscribe", rtType("stream_data"))
	a1r.none(0, "own stream_data", rtType("stream_data"))
	for _, id := range []string{"pub1", "pub2", "unsub1"} {
		a1r.none(0, "reply to "+id, rtReqIDIs(id))
		br.none(0, "reply to "+id, rtReqIDIs(id))
	}
}

// 04 §9 scenarios 28-30, and R3's name_taken.
func TestMCPRegistry(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	ar, br := rtRecord(t, alice), rtRecord(t, bob)

	// 28: register; the others hear of it, the host only gets the ack.
	ack := rtDecode[protocol.MCPRegisterAck](t, rtDo(t, bob, map[string]any{"type": "mcp_register", "serverName": "X", "description": "maths",
		"tools": []any{map[string]any{"name": "add", "description": "adds", "inputSchema": map[string]any{"type": "object"}}, map[string]any{"name": "sub"}}}))
	if ack.Type != "mcp_register_ack" || ack.ServerName != "X" || ack.ToolCount != 2 {
		t.Fatalf("ack %+v", ack)
	}
	p := decodePush(t, ar.wait(10*time.Second, "mcp_registered", isEvent("mcp_registered")))
	reg := rtDecodeRaw[protocol.MCPRegistered](t, p.EventData)
	if p.Priority != "low" || reg.ServerName != "X" || reg.Description != "maths" || reg.HostedBy != "bob" || strings.Join(reg.Tools, ",") != "add,sub" {
		t.Fatalf("mcp_registered %+v %s", p, p.EventData)
	}
	br.none(0, "own mcp_registered", isEvent("mcp_registered"))
	raw := rtDo(t, alice, map[string]any{"type": "mcp_list"}).Raw
	if strings.Contains(string(raw), "inputSchema") || strings.Contains(string(raw), "offlineSince") {
		t.Fatalf("mcp_list %s", raw)
	}
	list := rtMCPList(t, alice)
	if len(list) != 1 || list[0].HostedBy != "bob" || !list[0].Online || len(list[0].Tools) != 2 || list[0].Tools[0].Description != "adds" {
		t.Fatalf("mcp_list %+v", list)
	}
	// R3: another member may not take the name.
	rtFail(t, alice, map[string]any{"type": "mcp_register", "serverName": "X", "tools": []any{}}, "name_taken")

	// 29: calls are forwarded and answered.
	call := rtCallAsync(alice, "X", map[string]any{"a": 1, "b": 2})
	fwd := rtAnswer(t, bob, br, "X", map[string]any{"result": 42})
	if !uuidV4.MatchString(fwd.CallID) || fwd.ToolName != "echo" || fwd.CallerName != "alice" {
		t.Fatalf("forward %+v", fwd)
	}
	rtSameJSON(t, fwd.Args, `{"a":1,"b":2}`)
	if res := call.result(t, 10*time.Second); string(res.Result) != "42" || res.Error != "" || res.ReqID == "" {
		t.Fatalf("result %+v", res)
	}
	call = rtCallAsync(alice, "X", nil)
	rtAnswer(t, bob, br, "X", map[string]any{"error": "boom"})
	if res := call.result(t, 10*time.Second); res.Error != "boom" || res.Result != nil {
		t.Fatalf("error result %+v", res)
	}
	call = rtCallAsync(alice, "X", nil)
	rtAnswer(t, bob, br, "X", map[string]any{"result": nil})
	select {
	case f := <-call.done:
		if !strings.Contains(string(f.Raw), `"result":null`) {
			t.Fatalf("null result dropped: %s", f.Raw)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no result")
	}
	// The host may call itself.
	call = rtCallAsync(bob, "X", nil)
	rtAnswer(t, bob, br, "X", map[string]any{"result": "self"})
	if res := call.result(t, 10*time.Second); string(res.Result) != `"self"` {
		t.Fatalf("self call %+v", res)
	}
	// Silence times out; a late answer, or one from another presence, is ignored.
	b.realtime.ForTest().SetMCPCallTimeout(300 * time.Millisecond)
	call = rtCallAsync(alice, "X", nil)
	fwd = rtDecode[protocol.MCPCallForward](t, br.wait(10*time.Second, "forward", rtType("mcp_call_forward")))
	rtSend(t, alice, map[string]any{"type": "mcp_call_response", "callId": fwd.CallID, "result": "forged"})
	if res := call.result(t, 10*time.Second); res.Error != "MCP call timed out (0.3s)" {
		t.Fatalf("timeout result %+v", res)
	}
	rtSend(t, bob, map[string]any{"type": "mcp_call_response", "callId": fwd.CallID, "result": "late"})
	ar.none(200*time.Millisecond, "a second mcp_call_result", rtType("mcp_call_result"))
	b.realtime.ForTest().SetMCPCallTimeout(30 * time.Second)

	// 30: only the host unregisters, silently.
	rtSend(t, alice, map[string]any{"type": "mcp_unregister", "serverName": "X", "_reqId": "u1"})
	if len(rtMCPList(t, alice)) != 1 {
		t.Fatal("a non-host unregistered X")
	}
	rtSend(t, bob, map[string]any{"type": "mcp_unregister", "serverName": "X", "_reqId": "u2"})
	ev := rtEventData[protocol.MCPHostEvent](t, ar.wait(10*time.Second, "mcp_unregistered", isEvent("mcp_unregistered")))
	if ev.ServerName != "X" || ev.HostedBy != "bob" {
		t.Fatalf("mcp_unregistered %+v", ev)
	}
	if len(rtMCPList(t, alice)) != 0 {
		t.Fatal("X still listed")
	}
	ar.none(0, "reply to mcp_unregister", rtReqIDIs("u1"))
	br.none(0, "reply to mcp_unregister", rtReqIDIs("u2"))
	if res := rtCallNow(t, alice, "X"); res.Error != `MCP server "X" not found in mesh` {
		t.Fatalf("call after unregister %+v", res)
	}
	// Now the name is free for alice.
	rtRegister(t, alice, "X", false)
}

// 04 §9 scenarios 31-33.
func TestClock(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	ar, br := rtRecord(t, a), rtRecord(t, bob)

	// 32: no clock yet.
	for _, typ := range []string{"pause_clock", "resume_clock"} {
		if msg := rtFail(t, a, map[string]any{"type": typ}, "no_clock"); msg != "No clock running for this mesh" {
			t.Fatalf("%s: %q", typ, msg)
		}
	}
	st := rtClock(t, a, map[string]any{"type": "get_clock"})
	if st.Speed != 0 || !st.Paused || st.Tick != 0 || st.SimTime == "" || st.StartedAt == "" || st.ReqID == "" {
		t.Fatalf("get_clock without a clock: %+v", st)
	}

	// 31: speed clamps, then ticks to everyone.
	for _, tt := range []struct {
		speed any
		want  float64
	}{{0, 1}, {1000, 100}, {"abc", 1}, {2.5, 2.5}, {"7", 7}, {-3, 1}, {nil, 1}, {100, 100}} {
		frame := map[string]any{"type": "set_clock"}
		if tt.speed != nil {
			frame["speed"] = tt.speed
		}
		if st := rtClock(t, a, frame); st.Speed != tt.want || st.Paused || st.Tick != 0 {
			t.Fatalf("set_clock %v: %+v", tt.speed, st)
		}
	}
	start, _ := time.Parse(protocol.ISOLayout, st.SimTime)
	st = rtClock(t, a, map[string]any{"type": "get_clock"})
	simStart, _ := time.Parse(protocol.ISOLayout, st.SimTime)
	if simStart.Before(start.Add(-time.Second)) {
		t.Fatalf("sim time %v", st)
	}
	for i := int64(1); i <= 2; i++ {
		for _, r := range []*rtRec{ar, br} {
			p := decodePush(t, r.wait(10*time.Second, fmt.Sprint("tick ", i), isEvent("tick")))
			tk := rtDecodeRaw[protocol.Tick](t, p.EventData)
			if tk.Tick != i || tk.Speed != 100 || tk.SimTime != protocol.ISO(simStart.Add(time.Duration(i)*time.Minute)) || p.Priority != "low" {
				t.Fatalf("tick %d: %s", i, p.EventData)
			}
		}
	}

	// 33: paused clocks keep their new speed but do not tick.
	paused := rtClock(t, a, map[string]any{"type": "pause_clock"})
	if !paused.Paused {
		t.Fatalf("pause_clock %+v", paused)
	}
	ar.drain()
	if st := rtClock(t, a, map[string]any{"type": "set_clock", "speed": 5}); st.Speed != 5 || !st.Paused {
		t.Fatalf("set_clock while paused %+v", st)
	}
	rtClock(t, a, map[string]any{"type": "set_clock", "speed": 100})
	// A tick sent just before the pause may arrive late; only a later one
	// is a tick while paused.
	ar.none(800*time.Millisecond, "tick while paused", func(f client.Frame) bool {
		return isEvent("tick")(f) && rtEventData[protocol.Tick](t, f).Tick > paused.Tick
	})
	last := rtClock(t, bob, map[string]any{"type": "get_clock"}).Tick
	if st := rtClock(t, bob, map[string]any{"type": "resume_clock"}); st.Paused || st.Tick != last {
		t.Fatalf("resume_clock %+v", st)
	}
	if st := rtClock(t, bob, map[string]any{"type": "resume_clock"}); st.Paused {
		t.Fatalf("resume_clock on a running clock %+v", st)
	}
	if tk := rtEventData[protocol.Tick](t, ar.wait(10*time.Second, "tick after resume", isEvent("tick"))); tk.Tick != last+1 {
		t.Fatalf("tick %d after resume, want %d", tk.Tick, last+1)
	}
}

// 04 §9 scenarios 7 and 34-36, with A3's metadata-only audit payload.
func TestSharedState(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.LeaseTTL = 200 * time.Millisecond })
	f := b.fixture()
	sa1, sa2 := client.NewSession(), client.NewSession()
	a1 := b.connect(f.a, client.Options{Session: &sa1, DisplayName: "alice-laptop"})
	a2 := b.connect(f.a, client.Options{Session: &sa2})
	bob := b.connect(f.b, client.Options{})
	a1r, a2r, br := rtRecord(t, a1), rtRecord(t, a2), rtRecord(t, bob)

	// 34: the setter hears nothing; everyone else gets state_change with
	// the member's name from the database.
	rtSend(t, a1, map[string]any{"type": "set_state", "key": "k", "value": "v1"})
	for _, r := range []*rtRec{br, a2r} {
		sc := rtDecode[protocol.StateChange](t, r.wait(10*time.Second, "state_change", rtType("state_change")))
		if sc.Key != "k" || string(sc.Value) != `"v1"` || sc.UpdatedBy != "alice" {
			t.Fatalf("state_change %+v", sc)
		}
	}
	// 35: get_state hit and miss.
	res := rtDecode[protocol.StateResult](t, rtDo(t, a1, map[string]any{"type": "get_state", "key": "k"}))
	first, err := time.Parse(protocol.ISOLayout, res.UpdatedAt)
	if err != nil || res.Key != "k" || string(res.Value) != `"v1"` || res.UpdatedBy != "alice" || time.Since(first) > time.Minute {
		t.Fatalf("state_result %+v (%v)", res, err)
	}
	a1r.none(0, "state_change to the setter", rtType("state_change"))
	a1r.none(0, "unsolicited state_result", rtType("state_result"))
	miss := rtDo(t, a1, map[string]any{"type": "get_state", "key": "nope"})
	var m map[string]json.RawMessage
	_ = json.Unmarshal(miss.Raw, &m)
	if string(m["key"]) != `"nope"` || string(m["value"]) != "null" || string(m["updatedBy"]) != `""` || string(m["updatedAt"]) != `""` {
		t.Fatalf("miss %s", miss.Raw)
	}

	// 36: list_state by key; a re-set updates the one row.
	for _, k := range []string{"b", "a", "c"} {
		rtSend(t, bob, map[string]any{"type": "set_state", "key": k, "value": map[string]any{"k": k, "n": []any{1, 2.5}}})
	}
	time.Sleep(5 * time.Millisecond)
	rtSend(t, bob, map[string]any{"type": "set_state", "key": "k", "value": map[string]any{"a": 1}})
	list := rtDecode[protocol.StateList](t, rtDo(t, bob, map[string]any{"type": "list_state"})).Entries
	var keys []string
	for _, e := range list {
		keys = append(keys, e.Key)
	}
	if strings.Join(keys, ",") != "a,b,c,k" {
		t.Fatalf("list_state keys %v", keys)
	}
	k := list[3]
	rtSameJSON(t, k.Value, `{"a":1}`)
	if at, _ := time.Parse(protocol.ISOLayout, k.UpdatedAt); !at.After(first) || k.UpdatedBy != "bob" {
		t.Fatalf("re-set k: %+v (first at %v)", k, first)
	}
	var rows int64
	b.query(&rows, `SELECT count(*) FROM {state} WHERE mesh_id = ? AND "key" = 'k'`, f.meshID)
	if rows != 1 {
		t.Fatalf("%d rows for k", rows)
	}

	// 7 with A3: the audit row has the key, size and digest, never the value.
	var payloads []string
	waitFor(t, 10*time.Second, "state_set audit rows", func() bool {
		payloads = nil
		b.query(&payloads, "SELECT payload FROM {audit_log} WHERE mesh_id = ? AND event_type = 'state_set' ORDER BY id", f.meshID)
		return len(payloads) == 5
	})
	got := rtDecodeRaw[map[string]any](t, json.RawMessage(payloads[0]))
	want := sha256.Sum256([]byte(`"v1"`))
	if len(got) != 3 || got["key"] != "k" || got["size"] != float64(4) || got["sha256"] != hex.EncodeToString(want[:]) {
		t.Fatalf("state_set payload %s", payloads[0])
	}
	if n := rtAuditCount(b, f.meshID, "state_set", f.a.MemberID); n != 1 {
		t.Fatalf("%d state_set rows by alice", n)
	}

	// A null or missing value stores nothing and says nothing.
	rtSend(t, a1, map[string]any{"type": "set_state", "key": "z", "value": nil, "_reqId": "z1"})
	rtSend(t, a1, map[string]any{"type": "set_state", "key": "z", "_reqId": "z2"})
	if res := rtDecode[protocol.StateResult](t, rtDo(t, a1, map[string]any{"type": "get_state", "key": "z"})); res.Value != nil && string(res.Value) != "null" {
		t.Fatalf("null value stored: %+v", res)
	}
	a1r.none(0, "reply to a null set_state", func(f client.Frame) bool { return rtReqIDIs("z1")(f) || rtReqIDIs("z2")(f) })
	br.none(100*time.Millisecond, "state_change for a null value", func(f client.Frame) bool {
		return f.Type == "state_change" && strings.Contains(string(f.Raw), `"key":"z"`)
	})

	// State outlives every presence and the broker.
	for _, c := range []*client.Client{a1, a2, bob} {
		c.Kill()
		rtWaitEvicted(t, b, c.HelloAck.PresenceID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
	b2 := startWithConfig(t, b.cfg)
	carol := b2.connect(f.c, client.Options{})
	if n := len(rtDecode[protocol.StateList](t, rtDo(t, carol, map[string]any{"type": "list_state"})).Entries); n != 4 {
		t.Fatalf("%d keys after restart", n)
	}
}

// Bad input for every message type of the extras: an error frame echoing
// _reqId, nothing changed, the socket open.
func TestRealtimeBadInput(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.WatchAllowPrivate = true })
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	br := rtRecord(t, bob)
	for _, tt := range []struct {
		name  string
		frame map[string]any
		code  string
	}{
		{"watch without url", map[string]any{"type": "watch"}, "invalid_argument"},
		{"watch url not a string", map[string]any{"type": "watch", "url": 5}, "invalid_argument"},
		{"watch bad mode", map[string]any{"type": "watch", "url": "http://127.0.0.1:9/", "mode": "sha"}, "invalid_argument"},
		{"watch mode not a string", map[string]any{"type": "watch", "url": "http://127.0.0.1:9/", "mode": 1}, "invalid_argument"},
		{"watch headers not an object", map[string]any{"type": "watch", "url": "http://127.0.0.1:9/", "headers": "x"}, "invalid_argument"},
		{"watch header value not a string", map[string]any{"type": "watch", "url": "http://127.0.0.1:9/", "headers": map[string]any{"a": 1}}, "invalid_argument"},
		{"watch header name invalid", map[string]any{"type": "watch", "url": "http://127.0.0.1:9/", "headers": map[string]any{"a b": "1"}}, "invalid_argument"},
		{"watch header value multiline", map[string]any{"type": "watch", "url": "http://127.0.0.1:9/", "headers": map[string]any{"a": "1\r\nb: 2"}}, "invalid_argument"},
		{"watch label not a string", map[string]any{"type": "watch", "url": "http://127.0.0.1:9/", "label": true}, "invalid_argument"},
		{"watch notify_on not a string", map[string]any{"type": "watch", "url": "http://127.0.0.1:9/", "notify_on": []any{}}, "invalid_argument"},
		{"watch extract not a string", map[string]any{"type": "watch", "url": "http://127.0.0.1:9/", "extract": 1}, "invalid_argument"},
		{"unwatch without id", map[string]any{"type": "unwatch"}, "invalid_argument"},
		{"unwatch id not a string", map[string]any{"type": "unwatch", "watchId": 7}, "invalid_argument"},
		{"create_stream without name", map[string]any{"type": "create_stream"}, "invalid_argument"},
		{"create_stream empty name", map[string]any{"type": "create_stream", "name": ""}, "invalid_argument"},
		{"subscribe without stream", map[string]any{"type": "subscribe"}, "invalid_argument"},
		{"unsubscribe stream not a string", map[string]any{"type": "unsubscribe", "stream": 1}, "invalid_argument"},
		{"publish without stream", map[string]any{"type": "publish", "data": 1}, "invalid_argument"},
		{"mcp_register without name", map[string]any{"type": "mcp_register", "tools": []any{}}, "invalid_argument"},
		{"mcp_register tools missing", map[string]any{"type": "mcp_register", "serverName": "X"}, "invalid"},
		{"mcp_register tools not an array", map[string]any{"type": "mcp_register", "serverName": "X", "tools": "add"}, "invalid"},
		{"mcp_register tool without name", map[string]any{"type": "mcp_register", "serverName": "X", "tools": []any{map[string]any{"description": "d"}}}, "invalid"},
		{"mcp_register tool not an object", map[string]any{"type": "mcp_register", "serverName": "X", "tools": []any{"add"}}, "invalid"},
		{"mcp_register description not a string", map[string]any{"type": "mcp_register", "serverName": "X", "description": 1, "tools": []any{}}, "invalid_argument"},
		{"mcp_unregister without name", map[string]any{"type": "mcp_unregister"}, "invalid_argument"},
		{"mcp_call without server", map[string]any{"type": "mcp_call", "toolName": "t"}, "invalid_argument"},
		{"mcp_call without tool", map[string]any{"type": "mcp_call", "serverName": "X"}, "invalid_argument"},
		{"mcp_call_response without id", map[string]any{"type": "mcp_call_response", "result": 1}, "invalid_argument"},
		{"mcp_call_response error not a string", map[string]any{"type": "mcp_call_response", "callId": "c", "error": 1}, "invalid_argument"},
		{"pause_clock without clock", map[string]any{"type": "pause_clock"}, "no_clock"},
		{"resume_clock without clock", map[string]any{"type": "resume_clock"}, "no_clock"},
		{"set_state without key", map[string]any{"type": "set_state", "value": 1}, "invalid_argument"},
		{"set_state key not a string", map[string]any{"type": "set_state", "key": 1, "value": 1}, "invalid_argument"},
		{"get_state without key", map[string]any{"type": "get_state"}, "invalid_argument"},
		{"get_state key not a string", map[string]any{"type": "get_state", "key": []any{}}, "invalid_argument"},
	} {
		t.Run(tt.name, func(t *testing.T) { rtFail(t, a, tt.frame, tt.code) })
	}
	// Nothing changed, nobody was told, and the socket still answers.
	if len(rtWatchList(t, a)) != 0 || len(rtStreams(t, a)) != 0 || len(rtMCPList(t, a)) != 0 {
		t.Fatal("a bad frame changed something")
	}
	if n := len(rtDecode[protocol.StateList](t, rtDo(t, a, map[string]any{"type": "list_state"})).Entries); n != 0 {
		t.Fatalf("%d state keys after bad frames", n)
	}
	if st := rtClock(t, a, map[string]any{"type": "get_clock", "speed": "junk"}); st.Speed != 0 {
		t.Fatalf("clock %+v", st)
	}
	br.none(50*time.Millisecond, "any push", rtType("push"))
	br.none(0, "state_change", rtType("state_change"))
}

// Close stops every timer and check the extras started: clocks, watches
// and pending calls leave no goroutine behind.
func TestRealtimeCloseLeavesNothingRunning(t *testing.T) {
	// Not parallel: it counts the whole process's goroutines.
	base := runtime.NumGoroutine()
	slow := make(chan struct{})
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-slow:
		case <-r.Context().Done():
		}
	}))
	b := startTestBroker(t, func(c *config.Config) { c.WatchAllowPrivate = true })
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	br := rtRecord(t, bob)
	rtClock(t, a, map[string]any{"type": "set_clock", "speed": 100})
	rtDo(t, a, map[string]any{"type": "watch", "url": target.URL, "interval": 5}) // its baseline check hangs
	rtRegister(t, bob, "X", false)
	call := rtCallAsync(a, "X", nil)
	br.wait(10*time.Second, "forward", rtType("mcp_call_forward"))

	b.stop()
	select {
	case <-call.err:
	case f := <-call.done:
		t.Fatalf("pending call answered at shutdown: %s", f.Raw)
	case <-time.After(10 * time.Second):
		t.Fatal("pending call's client not released")
	}
	a.Kill()
	bob.Kill()
	close(slow)
	target.Close()
	goroutinesSettle(t, base, 5)
}

// Issue 16: the extras follow their lease across a broker restart. A owns
// a watch, a subscription and two MCP servers and the clock runs; the
// broker stops and starts again on the same storage. Before A is back, a
// call to its server fails at once (R3); once A reattaches, everything is
// there and works, and the clock continues from its tick.
func TestRealtimeRestartKeepsEverything(t *testing.T) {
	t.Parallel()
	// The reattach must land inside the restored lease, after a restart.
	b := startTestBroker(t, func(c *config.Config) { c.WatchAllowPrivate, c.LeaseTTL = true, 30*time.Second })
	f := b.fixture()
	target := rtServe(t, 200, "v1")
	sess := client.NewSession()
	a := b.connect(f.a, client.Options{Session: &sess, SessionID: "a1"})
	bob := b.connect(f.b, client.Options{SessionID: "b1"})
	br := rtRecord(t, bob)
	pid := a.HelloAck.PresenceID
	w := rtDecode[protocol.WatchAck](t, rtDo(t, a, map[string]any{"type": "watch", "url": target.url(), "interval": 3600}))
	base := rtBaseline(t, a, w.WatchID)
	rtDo(t, bob, map[string]any{"type": "create_stream", "name": "S"})
	rtDo(t, a, map[string]any{"type": "subscribe", "stream": "S"})
	rtRegister(t, a, "X", false)
	rtRegister(t, a, "Y", true)
	br.wait(10*time.Second, "mcp_registered Y", rtEventAbout("mcp_registered", "Y"))
	rtClock(t, a, map[string]any{"type": "set_clock", "speed": 100})
	br.wait(10*time.Second, "a tick", isEvent("tick"))
	b.stop()
	stoppedAt := b.realtime.GetClock(&services.Conn{MeshID: f.meshID})

	b2 := reopen(t, b)
	bob2 := b2.connect(f.b, client.Options{SessionID: "b1"})
	br2 := rtRecord(t, bob2)
	start := time.Now()
	if res := rtCallNow(t, bob2, "X"); !strings.HasPrefix(res.Error, "host_unavailable") || time.Since(start) > 10*time.Second { // not the 30 s call timeout
		t.Fatalf("call before the host is back: %+v after %v", res, time.Since(start))
	}
	if st := rtClock(t, bob2, map[string]any{"type": "get_clock"}); st.Paused || st.Speed != 100 || st.Tick < stoppedAt.Tick {
		t.Fatalf("clock after restart: %+v, stopped at %+v", st, stoppedAt)
	}

	a2 := b2.connect(f.a, client.Options{Session: &sess, SessionID: "a1"})
	if a2.HelloAck.PresenceID != pid {
		t.Fatalf("reattach after restart gave %s, want %s", a2.HelloAck.PresenceID, pid)
	}
	ar := rtRecord(t, a2)
	if got := rtWatchList(t, a2)[w.WatchID]; got.ID != w.WatchID || got.LastValue != base.LastValue || got.URL != base.URL {
		t.Fatalf("watch after restart: %+v (before %+v)", got, base)
	}
	target.set(200, "v2")
	if !b2.realtime.ForTest().CheckWatch(w.WatchID) {
		t.Fatal("restored watch does not poll")
	}
	ar.wait(10*time.Second, "watch_triggered", isEvent("watch_triggered"))
	rtSend(t, bob2, map[string]any{"type": "publish", "stream": "S", "data": "after"})
	ar.wait(10*time.Second, "stream_data", rtType("stream_data"))
	call := rtCallAsync(bob2, "X", map[string]any{"q": 1})
	rtAnswer(t, a2, ar, "X", map[string]any{"result": 42})
	if res := call.result(t, 10*time.Second); string(res.Result) != "42" || res.Error != "" {
		t.Fatalf("call after restart: %+v", res)
	}
	if y := rtMCPFind(rtMCPList(t, bob2), "Y"); y == nil || !y.Online {
		t.Fatalf("persistent server after restart: %+v", y)
	}
	for _, ev := range []string{"peer_left", "peer_joined", "peer_returned", "mcp_unregistered", "mcp_restored"} {
		br2.none(0, ev, isEvent(ev))
	}
}

// A restored lease nobody claims gets the full eviction cleanup when its
// window ends: its watch and subscription go, its plain MCP server goes
// and its persistent one waits offline, and the clock pauses once the mesh
// is empty.
func TestRealtimeRestoredLeaseEvictionCleansUp(t *testing.T) {
	t.Parallel()
	// The restored lease must outlast the rest of the start and the checks
	// just after it.
	b := startTestBroker(t, func(c *config.Config) { c.WatchAllowPrivate, c.LeaseTTL = true, 5*time.Second })
	f := b.fixture()
	target := rtServe(t, 200, "v1")
	sess := client.NewSession()
	a := b.connect(f.a, client.Options{Session: &sess, SessionID: "a1"})
	w := rtDecode[protocol.WatchAck](t, rtDo(t, a, map[string]any{"type": "watch", "url": target.url(), "interval": 3600}))
	rtBaseline(t, a, w.WatchID)
	rtDo(t, a, map[string]any{"type": "create_stream", "name": "S"})
	rtDo(t, a, map[string]any{"type": "subscribe", "stream": "S"})
	rtRegister(t, a, "X", false)
	rtRegister(t, a, "Y", true)
	rtClock(t, a, map[string]any{"type": "set_clock", "speed": 100})
	b.stop()

	b2 := reopen(t, b)
	mesh := &services.Conn{MeshID: f.meshID}
	if !b2.realtime.ForTest().HasWatch(w.WatchID) || len(b2.realtime.ListMCP(mesh)) != 2 || b2.realtime.GetClock(mesh).Paused {
		t.Fatal("extras not restored with the lease")
	}
	waitFor(t, 20*time.Second, "restored lease expired", func() bool { return b2.presence.MeshCount(f.meshID) == 0 })
	waitFor(t, 10*time.Second, "eviction cleanup", func() bool {
		list := b2.realtime.ListMCP(mesh)
		return !b2.realtime.ForTest().HasWatch(w.WatchID) && len(list) == 1 && list[0].Name == "Y" && !list[0].Online && b2.realtime.GetClock(mesh).Paused
	})
	streams := rtDecode[protocol.StreamList](t, rtDo(t, b2.connect(f.b, client.Options{}), map[string]any{"type": "list_streams"}))
	found := false
	for _, s := range streams.Streams {
		if s.Name == "S" {
			found = true
			if s.SubscriberCount != 0 {
				t.Fatalf("subscription survived the eviction: %+v", s)
			}
		}
	}
	if !found {
		t.Fatalf("stream S not listed: %+v", streams)
	}
}
