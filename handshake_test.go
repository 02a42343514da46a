package main

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/internal/clienttest"
	"github.com/claudemesh/meshbroker/protocol"
)

// 01 §14 scenario 1: a fresh member hello.
func TestFreshMemberHello(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	bob := b.connect(f.b, client.Options{SessionID: "bob-1"})
	alice := b.connect(f.a, client.Options{SessionID: "s1", Pid: 42})

	ack := alice.HelloAck
	if len(ack.PresenceID) != 32 || ack.MemberProfile == nil || ack.MemberDisplayName != "alice" {
		t.Fatalf("hello_ack: %s", alice.AckRaw)
	}
	if ack.LeaseTTLMs != b.cfg.LeaseTTL.Milliseconds() {
		t.Errorf("leaseTtlMs = %d", ack.LeaseTTLMs)
	}
	var rows []struct {
		Role           string
		SessionPubkey  *string
		DisconnectedAt *time.Time
		Pid            int
		SessionID      string
	}
	b.query(&rows, "SELECT role, session_pubkey, disconnected_at, pid, session_id FROM {presence} WHERE id = ?", ack.PresenceID)
	if len(rows) != 1 || rows[0].Role != "control-plane" || rows[0].SessionPubkey != nil || rows[0].DisconnectedAt != nil || rows[0].Pid != 42 || rows[0].SessionID != "s1" {
		t.Fatalf("presence row: %+v", rows)
	}
	joined := decodePush(t, waitFrame(t, bob, 10*time.Second, isEvent("peer_joined")))
	var data struct{ Name, Pubkey string }
	_ = json.Unmarshal(joined.EventData, &data)
	if data.Pubkey != f.a.Pubkey() || data.Name != "alice" || joined.SenderPubkey != "system" || joined.Priority != "low" {
		t.Fatalf("peer_joined: %+v %s", joined, joined.EventData)
	}
	waitFor(t, 10*time.Second, "audit peer_joined", func() bool {
		var n int64
		b.query(&n, "SELECT count(*) FROM {audit_log} WHERE mesh_id = ? AND event_type = 'peer_joined' AND actor_member_id = ?", f.meshID, f.a.MemberID)
		return n == 1
	})
}

// H5: hello_ack is the first frame, even when queued messages wait.
func TestHelloAckBeforeAnyPush(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(30*time.Second)) // the 2 s default ran out during the five sends on a busy machine
	f := b.fixture()
	sess := client.NewSession()
	bob := b.connect(f.b, client.Options{Session: &sess, SessionID: "b1"})
	alice := b.connect(f.a, client.Options{})
	bob.Kill() // grace: DMs queue
	for i := range 5 {
		n, c := sealTo(t, f.a.Key, pub(sess.Key), fmt.Sprint("m", i))
		if ack, err := alice.Send(ctxT(t), client.SendRequest{TargetSpec: sess.Pubkey(), Priority: "now", Nonce: n, Ciphertext: c}); err != nil || !ack.Queued {
			t.Fatalf("send: %+v %v", ack, err)
		}
	}
	ws, err := client.Dial(ctxT(t), b.url(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	if err := ws.WriteJSON(client.BuildHello(f.b, client.Options{Session: &sess, SessionID: "b1", Cwd: "/work/bob"})); err != nil {
		t.Fatal(err)
	}
	_ = ws.SetReadDeadline(time.Now().Add(20 * time.Second))
	var types []string
	for len(types) < 6 {
		_, data, err := ws.ReadMessage()
		if err != nil {
			t.Fatal(err)
		}
		var h struct{ Type, Nonce, Ciphertext string }
		_ = json.Unmarshal(data, &h)
		types = append(types, h.Type)
		if h.Type == "push" {
			body, err := client.Open(h.Nonce, h.Ciphertext, pub(f.a.Key), sess.Key)
			if err != nil || string(body) != fmt.Sprint("m", len(types)-2) {
				t.Fatalf("push %d out of order: %q %v", len(types)-1, body, err)
			}
		}
	}
	if types[0] != "hello_ack" {
		t.Fatalf("first frames %v: hello_ack must come first", types)
	}
}

func helloAt(offset time.Duration) client.Options {
	return client.Options{Now: func() time.Time { return time.Now().Add(offset) }}
}

// rejected connects and expects a handshake rejection with code and close.
func rejected(t *testing.T, b *testBroker, id client.Identity, opts client.Options, code string, closeCode int, msgPrefix string) {
	t.Helper()
	_, err := b.tryConnect(id, opts)
	var he *client.HandshakeError
	if !errors.As(err, &he) {
		t.Fatalf("want rejection %s, got %v", code, err)
	}
	if he.Code != code || !strings.HasPrefix(he.Message, msgPrefix) {
		t.Fatalf("rejection %q %q, want %q %q", he.Code, he.Message, code, msgPrefix)
	}
	if he.Close == nil || he.Close.Code != closeCode {
		t.Fatalf("close %+v, want %d", he.Close, closeCode)
	}
	reason := code
	if code == "revoked" {
		reason = "banned"
	}
	if he.Close.Text != reason {
		t.Fatalf("close reason %q, want %q", he.Close.Text, reason)
	}
}

// 01 §2.3 and §14 scenarios 2-4: every member-hello rejection row.
func TestMemberHelloRejections(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	_, other, _ := ed25519.GenerateKey(nil)
	stranger := client.Identity{MeshID: f.meshID, MemberID: "x", DisplayName: "x", Key: other}
	for _, tt := range []struct {
		name     string
		id       client.Identity
		opts     client.Options
		code     string
		close    int
		msg      string
		accepted bool
	}{
		{name: "skew -59s accepted", id: f.a, opts: helloAt(-59 * time.Second), accepted: true},
		{name: "skew -61s", id: f.a, opts: helloAt(-61 * time.Second), code: "timestamp_skew", close: 1008, msg: "hello rejected: timestamp_skew"},
		{name: "skew +61s", id: f.a, opts: helloAt(61 * time.Second), code: "timestamp_skew", close: 1008, msg: "hello rejected: timestamp_skew"},
		{name: "string timestamp", id: f.a, opts: clienttest.Mutate(client.Options{}, func(m map[string]any) { m["timestamp"] = fmt.Sprint(m["timestamp"]) }), code: "timestamp_skew", close: 1008},
		{name: "signed by another key", id: f.a, opts: clienttest.Mutate(client.Options{}, func(m map[string]any) {
			m["signature"] = protocol.Sign(other, protocol.HelloSigningString(f.meshID, f.a.MemberID, f.a.Pubkey(), m["timestamp"].(float64)))
		}), code: "bad_signature", close: 1008, msg: "hello rejected: bad_signature"},
		{name: "63-hex pubkey", id: f.a, opts: clienttest.Mutate(client.Options{}, func(m map[string]any) { m["pubkey"] = f.a.Pubkey()[:63] }), code: "malformed", close: 1008, msg: "hello rejected: malformed"},
		{name: "short signature", id: f.a, opts: clienttest.Mutate(client.Options{}, func(m map[string]any) { m["signature"] = "abcd" }), code: "malformed", close: 1008},
		{name: "memberId altered after signing", id: f.a, opts: clienttest.Mutate(client.Options{}, func(m map[string]any) { m["memberId"] = "other" }), code: "bad_signature", close: 1008},
		{name: "arbitrary memberId correctly signed", id: client.Identity{MeshID: f.meshID, MemberID: "anything", DisplayName: "alice", Key: f.a.Key}, accepted: true},
		{name: "uppercase sessionPubkey checked first", id: f.a, opts: clienttest.Mutate(client.Options{SessionPubkey: strings.Repeat("A", 64)}, func(m map[string]any) { m["signature"] = strings.Repeat("0", 128) }),
			code: "bad_session_pubkey", close: 1008, msg: "sessionPubkey must be 64 lowercase hex chars"},
		{name: "non-string sessionPubkey", id: f.a, opts: clienttest.Extra(client.Options{}, map[string]any{"sessionPubkey": 5}), code: "bad_session_pubkey", close: 1008},
		{name: "unknown pubkey", id: stranger, code: "unauthorized", close: 1008, msg: "pubkey not found in mesh"},
		{name: "revoked", id: f.r, code: "revoked", close: 4002, msg: fmt.Sprintf("You've been removed from %q. Contact the mesh owner to rejoin.", f.name)},
		{name: "uppercase pubkey passes signature, fails lookup", id: f.a, opts: clienttest.Mutate(client.Options{}, func(m map[string]any) {
			up := strings.ToUpper(f.a.Pubkey())
			m["pubkey"] = up
			m["signature"] = protocol.Sign(f.a.Key, protocol.HelloSigningString(f.meshID, f.a.MemberID, up, m["timestamp"].(float64)))
		}), code: "unauthorized", close: 1008},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if tt.accepted {
				c, err := b.tryConnect(tt.id, tt.opts)
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				c.Close()
				return
			}
			rejected(t, b, tt.id, tt.opts, tt.code, tt.close, tt.msg)
		})
	}
	var n int64
	b.query(&n, "SELECT count(*) FROM {presence} p JOIN {member} m ON m.id = p.member_id WHERE m.mesh_id = ?", f.meshID)
	if n != 2 {
		t.Fatalf("rejected hellos left presence rows: %d rows, want the 2 accepted", n)
	}
}

// 01 §3.3 and §14 scenarios 6-7: session hellos.
func TestSessionHello(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	daemon := b.connect(f.a, client.Options{SessionID: "daemon-1"})
	bob := b.connect(f.b, client.Options{})
	sess := client.NewSession()
	s := b.connect(f.a, client.Options{Session: &sess, SessionID: "claude-1"})
	if s.HelloAck.MemberProfile == nil || s.HelloAck.Restored || s.HelloAck.Services != nil {
		t.Fatalf("session ack: %s", s.AckRaw)
	}
	var rows []struct {
		Role, MemberID string
		SessionPubkey  *string
	}
	b.query(&rows, "SELECT role, member_id, session_pubkey FROM {presence} WHERE id = ?", s.HelloAck.PresenceID)
	if len(rows) != 1 || rows[0].Role != "session" || rows[0].MemberID != f.a.MemberID || rows[0].SessionPubkey == nil || *rows[0].SessionPubkey != sess.Pubkey() {
		t.Fatalf("row %+v", rows)
	}
	for _, c := range []*client.Client{daemon, bob} {
		waitFrame(t, c, 10*time.Second, func(f client.Frame) bool {
			return isEvent("peer_joined")(f) && strings.Contains(string(f.Raw), sess.Pubkey())
		})
	}
}

func TestSessionHelloRejections(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	sess := client.NewSession()
	other := client.NewSession()
	resign := func(m map[string]any) {
		ts := m["timestamp"].(float64)
		m["signature"] = protocol.Sign(sess.Key, protocol.SessionHelloString(f.meshID, m["parentMemberPubkey"].(string), sess.Pubkey(), ts))
	}
	att := func(m map[string]any) map[string]any { return m["parentAttestation"].(map[string]any) }
	reattest := func(key ed25519.PrivateKey, exp float64) func(map[string]any) {
		return func(m map[string]any) {
			a := att(m)
			a["expiresAt"] = exp
			a["signature"] = protocol.Sign(key, protocol.SessionAttestString(f.a.Pubkey(), sess.Pubkey(), exp))
		}
	}
	nowMs := float64(time.Now().UnixMilli())
	for _, tt := range []struct {
		name, code, msg string
		close           int
		mutate          func(map[string]any)
	}{
		{"session key uppercase", "bad_session_pubkey", "sessionPubkey must be 64 lowercase hex chars", 1008, func(m map[string]any) { m["sessionPubkey"] = strings.ToUpper(sess.Pubkey()) }},
		{"parent key bad", "bad_parent_pubkey", "parentMemberPubkey must be 64 lowercase hex chars", 1008, func(m map[string]any) { m["parentMemberPubkey"] = "xyz" }},
		{"attestation binds another session", "attestation_mismatch", "parentAttestation does not bind", 1008, func(m map[string]any) { att(m)["sessionPubkey"] = other.Pubkey() }},
		{"attestation missing", "attestation_mismatch", "parentAttestation", 1008, func(m map[string]any) { delete(m, "parentAttestation") }},
		{"expired", "expired", "attestation rejected: expired", 1008, reattest(f.a.Key, nowMs-1)},
		{"ttl too long", "ttl_too_long", "attestation rejected: ttl_too_long", 1008, reattest(f.a.Key, nowMs+86_400_000+60_000)},
		{"expiresAt not a number", "malformed", "attestation rejected: malformed", 1008, func(m map[string]any) { att(m)["expiresAt"] = "soon" }},
		{"attestation signed by the session key", "bad_signature", "attestation rejected: bad_signature", 1008, reattest(sess.Key, nowMs+3_600_000)},
		{"hello signed by the parent key", "bad_signature", "session_hello rejected: bad_signature", 1008, func(m map[string]any) {
			m["signature"] = protocol.Sign(f.a.Key, protocol.SessionHelloString(f.meshID, f.a.Pubkey(), sess.Pubkey(), m["timestamp"].(float64)))
		}},
		{"hello skewed", "timestamp_skew", "session_hello rejected: timestamp_skew", 1008, func(m map[string]any) { m["timestamp"] = nowMs - 120_000; resign(m) }},
		{"wrong parentMemberId", "parent_member_id_mismatch", "parentMemberId does not match parentMemberPubkey", 1008, func(m map[string]any) { m["parentMemberId"] = f.b.MemberID }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rejected(t, b, f.a, clienttest.Mutate(client.Options{Session: &sess}, tt.mutate), tt.code, tt.close, tt.msg)
		})
	}
	t.Run("revoked parent", func(t *testing.T) {
		rejected(t, b, f.r, client.Options{Session: &sess}, "revoked", 4002, "You've been removed")
	})
	t.Run("parent not a member", func(t *testing.T) {
		_, k, _ := ed25519.GenerateKey(nil)
		rejected(t, b, client.Identity{MeshID: f.meshID, Key: k}, client.Options{Session: &sess}, "unauthorized", 1008, "parent pubkey not found in mesh")
	})
}

// 01 §14 scenario 5 and H2: capacity counts offline leases, never blocks a
// reattach of one's own lease.
func TestCapacity(t *testing.T) {
	t.Parallel()
	// The reattach must land inside the lease, after a refused hello.
	b := startTestBroker(t, withLease(30*time.Second), func(c *config.Config) { c.MaxConnectionsPerMesh = 1 })
	f := b.fixture()
	sess := client.NewSession()
	a := b.connect(f.a, client.Options{Session: &sess})
	rejected(t, b, f.b, client.Options{}, "capacity", 1008, "mesh at connection capacity")
	a.Kill()
	rejected(t, b, f.b, client.Options{}, "capacity", 1008, "mesh at connection capacity")
	again := b.connect(f.a, client.Options{Session: &sess})
	if again.HelloAck.PresenceID != a.HelloAck.PresenceID {
		t.Fatalf("reattach at capacity got a new presence")
	}
}

// 01 §14 scenario 8 and H8: frames before and after hello.
func TestFramesBeforeAndAfterHello(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	ws, err := client.Dial(ctxT(t), b.url(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	read := func() protocol.ErrorFrame {
		t.Helper()
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, data, err := ws.ReadMessage()
		if err != nil {
			t.Fatal(err)
		}
		var e protocol.ErrorFrame
		_ = json.Unmarshal(data, &e)
		return e
	}
	_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"list_peers"}`))
	if e := read(); e.Code != "no_hello" || e.Message != "must send hello first" {
		t.Fatalf("before hello: %+v", e)
	}
	_ = ws.WriteMessage(websocket.TextMessage, []byte(`not json`))
	if e := read(); e.Code != "malformed" {
		t.Fatalf("garbage: %+v", e)
	}
	c := b.connect(f.a, client.Options{})
	for _, tt := range []struct{ frame, code string }{
		{`{"type":"no_such","_reqId":"u1"}`, "unsupported"},
		{`{"type":"vector_store","_reqId":"u2"}`, "unsupported"},
		{`{"type":"set_status","status":"busy","_reqId":"u3"}`, "invalid_argument"},
		{`{"type":"join_group","name":5,"_reqId":"u4"}`, "invalid_argument"},
	} {
		_ = c.WriteRaw([]byte(tt.frame))
		fr := waitFrame(t, c, 10*time.Second, func(f client.Frame) bool { return f.Type == "error" })
		var e protocol.ErrorFrame
		_ = fr.Decode(&e)
		if string(e.Code) != tt.code || e.ReqID == "" {
			t.Fatalf("%s → %s", tt.frame, fr.Raw)
		}
	}
	// A second hello on an authenticated socket is refused and changes nothing (H4).
	_ = c.WriteJSON(map[string]any{"type": "hello", "meshId": f.meshID})
	fr := waitFrame(t, c, 10*time.Second, func(f client.Frame) bool { return f.Type == "error" })
	if !strings.Contains(string(fr.Raw), "already_authenticated") {
		t.Fatalf("second hello: %s", fr.Raw)
	}
	if _, err := c.ListPeers(ctxT(t)); err != nil {
		t.Fatalf("socket unusable after bad frames: %v", err)
	}
}

// 01 §14 scenario 14 and H3: session-id dedup replaces the member's own
// socket only.
func TestSessionIDDedup(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	bob := b.connect(f.b, client.Options{SessionID: "s1"})
	first := b.connect(f.a, client.Options{SessionID: "s1"})
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	second := b.connect(f.a, client.Options{SessionID: "s1"})
	select {
	case <-first.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("old socket not closed")
	}
	if ce := first.CloseError(); ce == nil || ce.Code != 1000 || ce.Text != "session_replaced" {
		t.Fatalf("old socket close: %+v", ce)
	}
	if second.HelloAck.PresenceID == first.HelloAck.PresenceID {
		t.Fatal("dedup kept the presence id")
	}
	var disc []*time.Time
	b.query(&disc, "SELECT disconnected_at FROM {presence} WHERE id = ?", first.HelloAck.PresenceID)
	if len(disc) != 1 || disc[0] == nil {
		t.Fatal("old row not disconnected")
	}
	waitFrame(t, bob, 10*time.Second, func(f client.Frame) bool { return isEvent("peer_joined")(f) || isEvent("peer_returned")(f) })
	if left := collect(bob, 200*time.Millisecond, isEvent("peer_left")); len(left) != 0 {
		t.Fatalf("dedup sent peer_left")
	}
	// Bob's socket with the same session id is another member's: untouched.
	select {
	case <-bob.Done():
		t.Fatal("dedup crossed members")
	default:
	}
	if got := b.presence.MeshCount(f.meshID); got != 2 {
		t.Fatalf("registry count %d after dedup, want 2", got)
	}
}

// 01 §14 scenario 16: peer_state restore on the next member hello.
func TestPeerStateRestore(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.LeaseTTL = 100 * time.Millisecond })
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	a := b.connect(f.a, client.Options{SessionID: "x1", Groups: []protocol.Group{{Name: "eng", Role: "lead"}}})
	_ = a.WriteJSON(map[string]any{"type": "set_summary", "summary": "refactoring"})
	if _, err := a.Request(ctxT(t), map[string]any{"type": "set_profile", "title": "lead"}); err != nil {
		t.Fatal(err)
	}
	a.Close()
	waitFrame(t, bob, 10*time.Second, isEvent("peer_left"))
	// The close saves peer_state in the background; the hello restores
	// only what it finds.
	waitFor(t, 10*time.Second, "peer_state saved at close", func() bool {
		var n int64
		b.query(&n, "SELECT count(*) FROM {peer_state} WHERE member_id = ?", f.a.MemberID)
		return n == 1
	})
	again := b.connect(f.a, client.Options{SessionID: "x2"})
	ack := again.HelloAck
	if !ack.Restored || ack.LastSeenAt == "" || len(ack.RestoredGroups) != 1 || ack.RestoredGroups[0].Name != "eng" || ack.LastSummary != "refactoring" {
		t.Fatalf("restore ack: %s", again.AckRaw)
	}
	if _, err := time.Parse(protocol.ISOLayout, ack.LastSeenAt); err != nil {
		t.Fatalf("lastSeenAt %q: %v", ack.LastSeenAt, err)
	}
	p := decodePush(t, waitFrame(t, bob, 10*time.Second, isEvent("peer_returned")))
	if !strings.Contains(string(p.EventData), "lastSeenAt") {
		t.Fatalf("peer_returned %s", p.EventData)
	}
	peers, err := bob.ListPeers(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, pe := range peers {
		if pe.Pubkey == f.a.Pubkey() && !strings.Contains(string(pe.Profile), `"title":"lead"`) {
			t.Fatalf("profile not restored: %+v", pe)
		}
	}
}

// 01 §14 scenario 19: only exactly /ws upgrades.
func TestUpgradeOnlyOnExactPath(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	for _, path := range []string{"/ws?x=1", "/other", "/ws/"} {
		conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", b.Port()))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", path)
		_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		if err == nil || line != "" {
			t.Fatalf("%s answered %q", path, line)
		}
	}
	ws, err := client.Dial(ctxT(t), b.url(), nil)
	if err != nil {
		t.Fatalf("/ws refused: %v", err)
	}
	ws.Close()
}

// A burst of sockets that never say hello is closed at the hello timeout
// and leaves no goroutines behind.
func TestHelloTimeoutBurst(t *testing.T) {
	// Not parallel: it counts the whole process's goroutines.
	b := startTestBroker(t, func(c *config.Config) { c.HelloTimeout = 150 * time.Millisecond })
	base := runtime.NumGoroutine()
	var socks []*websocket.Conn
	for range 50 {
		ws, err := client.Dial(ctxT(t), b.url(), nil)
		if err != nil {
			t.Fatal(err)
		}
		socks = append(socks, ws)
	}
	for _, ws := range socks {
		_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, data, err := ws.ReadMessage()
		if err != nil || !strings.Contains(string(data), `"hello_timeout"`) {
			t.Fatalf("want hello_timeout error, got %s %v", data, err)
		}
		_, _, err = ws.ReadMessage()
		var ce *websocket.CloseError
		if !errors.As(err, &ce) || ce.Code != 1008 || ce.Text != "hello_timeout" {
			t.Fatalf("close %v", err)
		}
		ws.Close()
	}
	goroutinesSettle(t, base, 5)
}

// Oversized frames close the socket with 1009 and store nothing.
func TestOversizeFrame(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.MaxMessageBytes = 4096 })
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	_ = a.WriteRaw([]byte(`{"type":"send","id":"big","targetSpec":"*","nonce":"","ciphertext":"` + strings.Repeat("A", 5000) + `"}`))
	<-a.Done()
	if ce := a.CloseError(); ce == nil || ce.Code != 1009 {
		t.Fatalf("close %+v", ce)
	}
	var n int64
	b.query(&n, "SELECT count(*) FROM {message_queue} WHERE mesh_id = ?", f.meshID)
	if n != 0 {
		t.Fatal("oversized send stored")
	}
}

// 01 §14 scenario 18 with S2: shutdown keeps the rows as leases, closes
// sockets with 1001, sends no peer_left, and leaves no goroutine behind.
func TestShutdown(t *testing.T) {
	// Not parallel: it counts the whole process's goroutines.
	base := runtime.NumGoroutine()
	b := startTestBroker(t)
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	raw, err := client.Dial(ctxT(t), b.url(), nil) // unauthenticated, also closed
	if err != nil {
		t.Fatal(err)
	}
	rawClosed := make(chan error, 1)
	go func() { _, _, err := raw.ReadMessage(); rawClosed <- err }()
	b.stop()
	for _, c := range []*client.Client{a, bob} {
		<-c.Done()
		if ce := c.CloseError(); ce == nil || ce.Code != 1001 || ce.Text != "shutting down" {
			t.Fatalf("close %+v", ce)
		}
	}
	err = <-rawClosed
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 1001 {
		t.Fatalf("unauthenticated socket: %v", err)
	}
	raw.Close()
	if len(collect(bob, 50*time.Millisecond, isEvent("peer_left"))) != 0 {
		t.Fatal("peer_left at shutdown")
	}
	goroutinesSettle(t, base, 10)
	// S2: the rows are kept as leases for the next process, which restores
	// them as offline leases.
	db := reopen(t, b)
	var n int64
	db.query(&n, "SELECT count(*) FROM {presence} WHERE disconnected_at IS NULL")
	if n != 2 {
		t.Fatalf("%d presence rows live after shutdown, want the 2 held as leases", n)
	}
	var states []string
	db.query(&states, "SELECT state FROM "+db.db.Table("meshbroker_node")+" ORDER BY epoch")
	if len(states) != 2 || states[0] != "stopped" || states[1] != "running" {
		t.Fatalf("node states %v, want [stopped running]", states)
	}
	for _, id := range []string{a.HelloAck.PresenceID, bob.HelloAck.PresenceID} {
		if c := db.presence.Get(id); c == nil || db.presence.Online(c) {
			t.Fatalf("presence %s not restored as an offline lease", id)
		}
	}
}

// reopen starts a new broker on the same storage as a stopped one.
func reopen(t *testing.T, old *testBroker) *testBroker {
	t.Helper()
	return startWithConfig(t, old.cfg)
}

var _ = context.Background

// Bad input of every kind before and at hello: always the documented
// error, never a panic, a leaked goroutine or a row.
func TestBadHelloFlood(t *testing.T) {
	// Not parallel: it counts the whole process's goroutines.
	b := startTestBroker(t)
	f := b.fixture()
	base := runtime.NumGoroutine()
	frames := []string{
		`{`, `[]`, `"hello"`, `{"type":"hello"}`, `{"type":"hello","pubkey":5}`,
		`{"type":"hello","meshId":"` + f.meshID + `","pubkey":"` + f.a.Pubkey() + `","timestamp":1,"signature":"00"}`,
		`{"type":"session_hello","meshId":"` + f.meshID + `","sessionPubkey":"` + strings.Repeat("a", 64) + `","parentMemberPubkey":"` + f.a.Pubkey() + `","parentAttestation":"x"}`,
		`{"type":"session_hello","parentAttestation":{"expiresAt":"soon"}}`,
		`{"type":"hello","groups":"eng","sessionPubkey":[],"timestamp":{}}`,
	}
	var wg sync.WaitGroup
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ws, err := client.Dial(ctxT(t), b.url(), nil)
			if err != nil {
				t.Error(err)
				return
			}
			defer ws.Close()
			_ = ws.WriteMessage(websocket.TextMessage, []byte(frames[i%len(frames)]))
			_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, data, err := ws.ReadMessage()
			if err != nil || !strings.Contains(string(data), `"type":"error"`) {
				t.Errorf("frame %q: %s %v", frames[i%len(frames)], data, err)
			}
		}()
	}
	wg.Wait()
	var n int64
	b.query(&n, "SELECT count(*) FROM {presence}")
	if n != 0 {
		t.Fatalf("%d presence rows from bad hellos", n)
	}
	if _, err := b.tryConnect(f.a, client.Options{}); err != nil {
		t.Fatalf("broker unusable after the flood: %v", err)
	}
	goroutinesSettle(t, base, 15)
}

// A closed socket gets its close grace even from a peer that keeps sending:
// here one that never says hello, never answers the close, and sends a
// pong every 50 ms. Renewing the read deadline for those pongs used to
// hold the socket open indefinitely.
func TestClosedSocketEndsDespiteTraffic(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.HelloTimeout = 150 * time.Millisecond })
	ws, err := client.Dial(ctxT(t), b.url(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	ws.SetCloseHandler(func(int, string) error { return nil }) // never answer the close
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				if ws.WriteControl(websocket.PongMessage, nil, time.Now().Add(time.Second)) != nil {
					return
				}
			}
		}
	}()
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _, err = ws.ReadMessage() // the hello_timeout error frame
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = ws.ReadMessage()
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 1008 {
		t.Fatalf("want the hello_timeout close, got %v", err)
	}
	// The WebSocket reader is done; watch the TCP connection itself.
	raw := ws.NetConn()
	_ = raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		_, err := raw.Read(make([]byte, 64))
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("connection still open 10 s after the hello_timeout close (its close grace is 1 s)")
		}
		return // EOF or reset: the broker dropped it
	}
}
