package main

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/protocol"
)

func (b *testBroker) status(presenceID string) (status, source string) {
	b.t.Helper()
	var rows []struct{ Status, StatusSource string }
	b.query(&rows, "SELECT status, status_source FROM {presence} WHERE id = ?", presenceID)
	if len(rows) != 1 {
		b.t.Fatalf("presence %s: %d rows", presenceID, len(rows))
	}
	return rows[0].Status, rows[0].StatusSource
}

// 03 §12 scenarios 6-8, 10-12: the hook route's answers and effects.
func TestHookSetStatus(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.PendingSweepInterval = 20 * time.Millisecond })
	f := b.fixture()
	code, out := postHook(t, b, `{"cwd":"/p1","pid":7,"status":"working"}`)
	if code != 200 || out["ok"] != true || out["pending"] != true {
		t.Fatalf("pending: %d %v", code, out)
	}
	var pend []struct {
		Pid          int
		Cwd, Status  string
		StatusSource string
		AppliedAt    *time.Time
	}
	b.query(&pend, "SELECT pid, cwd, status, status_source, applied_at FROM {pending_status}")
	if len(pend) != 1 || pend[0].Pid != 7 || pend[0].Cwd != "/p1" || pend[0].Status != "working" || pend[0].StatusSource != "hook" {
		t.Fatalf("pending row %+v", pend)
	}
	// A hello with that pid and cwd within the window takes the status.
	a := b.connect(f.a, client.Options{Pid: 7, Cwd: "/p1"})
	if st, src := b.status(a.HelloAck.PresenceID); st != "working" || src != "hook" {
		t.Fatalf("hello after hook: %s/%s", st, src)
	}
	waitFor(t, 10*time.Second, "applied pending row swept", func() bool {
		var n int64
		b.query(&n, "SELECT count(*) FROM {pending_status}")
		return n == 0
	})
	// Matched by pid+cwd, then by cwd alone (newest connection).
	code, out = postHook(t, b, `{"cwd":"/p1","pid":999,"status":"idle"}`)
	if code != 200 || out["presence_id"] != a.HelloAck.PresenceID {
		t.Fatalf("cwd fallback: %d %v", code, out)
	}
	if st, src := b.status(a.HelloAck.PresenceID); st != "idle" || src != "hook" {
		t.Fatalf("after idle hook: %s/%s", st, src)
	}
	for _, tt := range []struct {
		body string
		code int
		want string
	}{
		{`{"pid":1,"status":"idle"}`, 200, `{"ok":false,"error":"cwd and status required"}`},
		{`{"cwd":"/p1"}`, 200, `{"ok":false,"error":"cwd and status required"}`},
		{`{"cwd":"/p1","status":"sleeping"}`, 400, `{"ok":false,"error":"invalid status"}`},
		{`not json`, 500, `"ok":false`},
		{``, 500, `"ok":false`},
	} {
		c, _, body := httpDo(t, "POST", b.httpURL("/hook/set-status"), tt.body)
		if c != tt.code || !strings.Contains(body, tt.want) {
			t.Errorf("%q → %d %s", tt.body, c, body)
		}
	}
	if st, _ := b.status(a.HelloAck.PresenceID); st != "idle" {
		t.Fatal("bad hook requests changed the status")
	}
}

// A hook for a cwd nobody has is parked, then swept after its 10 s TTL
// (shrunk); a hello after that starts idle/jsonl.
func TestPendingStatusExpires(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) {
		c.PendingStatusTTL, c.PendingSweepInterval = 100*time.Millisecond, 20*time.Millisecond
	})
	f := b.fixture()
	postHook(t, b, `{"cwd":"/late","pid":9,"status":"working"}`)
	waitFor(t, 10*time.Second, "pending swept", func() bool {
		var n int64
		b.query(&n, "SELECT count(*) FROM {pending_status}")
		return n == 0
	})
	a := b.connect(f.a, client.Options{Pid: 9, Cwd: "/late"})
	if st, src := b.status(a.HelloAck.PresenceID); st != "idle" || src != "jsonl" {
		t.Fatalf("expired pending applied: %s/%s", st, src)
	}
}

// 03 §12 scenarios 9 and 16: dnd survives hooks; only manual leaves it.
func TestDNDSurvivesHook(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	a := b.connect(f.a, client.Options{Cwd: "/dnd"})
	_ = a.WriteJSON(map[string]any{"type": "set_status", "status": "dnd"})
	peers, _ := a.ListPeers(ctxT(t))
	if len(peers) != 1 || peers[0].Status != "dnd" {
		t.Fatalf("list after dnd: %+v", peers)
	}
	if st, src := b.status(a.HelloAck.PresenceID); st != "dnd" || src != "manual" {
		t.Fatalf("%s/%s", st, src)
	}
	code, out := postHook(t, b, `{"cwd":"/dnd","status":"idle"}`)
	if code != 200 || out["presence_id"] != a.HelloAck.PresenceID {
		t.Fatalf("%d %v", code, out)
	}
	if st, _ := b.status(a.HelloAck.PresenceID); st != "dnd" {
		t.Fatal("hook cleared dnd")
	}
	_ = a.WriteJSON(map[string]any{"type": "set_status", "status": "idle"})
	_, _ = a.ListPeers(ctxT(t))
	if st, _ := b.status(a.HelloAck.PresenceID); st != "idle" {
		t.Fatal("manual idle did not clear dnd")
	}
}

// 03 §12 scenario 17 and S3: the TTL sweeper flips a stuck `working` to
// idle and releases held messages; dnd is untouched.
func TestStatusTTLSweeper(t *testing.T) {
	t.Parallel()
	// The TTL runs on the broker's clock, which the test moves: a 200 ms TTL
	// ran out on a busy machine before the held message was even sent. 20 s
	// is ten times what this setup takes there, and moving the clock that far
	// stays inside the pong timeout, stale threshold and claim lease.
	const ttl = 20 * time.Second
	b := startTestBroker(t, func(c *config.Config) {
		c.StatusTTL, c.StatusSweepInterval, c.HookFreshWindow = ttl, 20*time.Millisecond, time.Hour
	})
	m := b.msgFixture()
	postHook(t, b, `{"cwd":"/b1","status":"working"}`)
	_ = m.c1.WriteJSON(map[string]any{"type": "set_status", "status": "dnd"})
	_, _ = m.c1.ListPeers(ctxT(t))
	held := dm(t, m.a1, m.sa1, m.sb1, "next", "held")
	if got := collect(m.b1, 100*time.Millisecond, isMessage); len(got) != 0 {
		t.Fatal("working peer got next")
	}
	b.advance(ttl + time.Second)
	p := decodePush(t, waitFrame(t, m.b1, 10*time.Second, isMessage))
	if p.MessageID != held.MessageID {
		t.Fatal("wrong message released")
	}
	if st, src := b.status(m.b1.HelloAck.PresenceID); st != "idle" || src != "jsonl" {
		t.Fatalf("after sweep: %s/%s", st, src)
	}
	if st, _ := b.status(m.c1.HelloAck.PresenceID); st != "dnd" {
		t.Fatal("sweeper touched dnd")
	}
	_, _, body := httpDo(t, "GET", b.httpURL("/metrics"), "")
	if !strings.Contains(body, `broker_ttl_sweeps_total{flipped="1"}`) {
		t.Fatalf("ttl sweep metric:\n%s", grepLines(body, "ttl_sweeps"))
	}
}

// 03 §12 scenario 13: the hook rate limit, per (pid, cwd), then recovery.
func TestHookRateLimit(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.HookRateLimitPerMin = 5 })
	for i := range 5 {
		if code, _ := postHook(t, b, `{"cwd":"/rate-test","pid":42,"status":"idle"}`); code != 200 {
			t.Fatalf("request %d: %d", i, code)
		}
	}
	code, out := postHook(t, b, `{"cwd":"/rate-test","pid":42,"status":"idle"}`)
	if code != 429 || out["error"] != "rate limited" || out["ok"] != false {
		t.Fatalf("%d %v", code, out)
	}
	if code, _ := postHook(t, b, `{"cwd":"/other","pid":42,"status":"idle"}`); code != 200 {
		t.Fatal("another key was limited")
	}
	b.advance(12 * time.Second) // 5/min refills one token in 12 s
	if code, _ := postHook(t, b, `{"cwd":"/rate-test","pid":42,"status":"idle"}`); code != 200 {
		t.Fatal("no recovery")
	}
	_, _, body := httpDo(t, "GET", b.httpURL("/metrics"), "")
	if !strings.Contains(body, "broker_hook_requests_rate_limited_total 1\n") || !strings.Contains(body, "broker_hook_requests_total 8\n") {
		t.Fatalf("hook metrics:\n%s", grepLines(body, "broker_hook"))
	}
}

// 03 §6.7 and R1/H2: moderation is for owners and admins, runs the one
// eviction path without peer_left, and keeps the capacity count right.
func TestModeration(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(5*time.Second))
	f := b.fixture()
	admin := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{DisplayName: "Bob"})
	carol := b.connect(f.c, client.Options{})
	_, err := carol.Request(ctxT(t), map[string]any{"type": "disconnect", "target": "Bob"})
	var er *client.ErrorReply
	if !errors.As(err, &er) || er.Code != "forbidden" || er.Message != "only owner or admin can disconnected" {
		t.Fatalf("non-admin disconnect: %v", err)
	}
	if _, err := carol.Request(ctxT(t), map[string]any{"type": "ban", "target": "bob"}); !errors.As(err, &er) || er.Code != "forbidden" {
		t.Fatalf("non-admin ban: %v", err)
	}
	select {
	case <-bob.Done():
		t.Fatal("refused moderation closed a socket")
	default:
	}
	fr, err := admin.Request(ctxT(t), map[string]any{"type": "disconnect", "target": "Bob"})
	if err != nil {
		t.Fatal(err)
	}
	var ack protocol.ModerationAck
	_ = fr.Decode(&ack)
	if ack.Type != "disconnect_ack" || len(ack.Kicked) != 1 || ack.Kicked[0] != "Bob" {
		t.Fatalf("%s", fr.Raw)
	}
	<-bob.Done()
	if ce := bob.CloseError(); ce == nil || ce.Code != 1000 || ce.Text != "disconnected" {
		t.Fatalf("close %+v", ce)
	}
	if got := collect(carol, 100*time.Millisecond, isEvent("peer_left")); len(got) != 0 {
		t.Fatal("disconnect sent peer_left")
	}
	if n := b.presence.MeshCount(f.meshID); n != 2 {
		t.Fatalf("count %d after disconnect, want 2", n)
	}
	// Ban: 4002 now and at the next hello.
	bob2 := b.connect(f.b, client.Options{DisplayName: "Bob"})
	fr, err = admin.Request(ctxT(t), map[string]any{"type": "ban", "target": f.b.Pubkey()[:12]})
	if err != nil || !strings.Contains(string(fr.Raw), `"banned":"bob"`) {
		t.Fatalf("ban: %s %v", fr.Raw, err)
	}
	<-bob2.Done()
	if ce := bob2.CloseError(); ce == nil || ce.Code != 4002 || ce.Text != "banned" {
		t.Fatalf("ban close %+v", ce)
	}
	rejected(t, b, f.b, client.Options{}, "revoked", 4002, "You've been removed")
	if _, err := admin.Request(ctxT(t), map[string]any{"type": "unban", "target": "bob"}); err != nil {
		t.Fatal(err)
	}
	b.connect(f.b, client.Options{})
	waitFor(t, 10*time.Second, "ban audited", func() bool {
		return b.auditCount(f.meshID, "member_banned") == 1 && b.auditCount(f.meshID, "member_unbanned") == 1
	})
	// Kick skips control-plane sockets and closes sessions with 4001.
	sess := client.NewSession()
	cs := b.connect(f.c, client.Options{Session: &sess})
	fr, err = admin.Request(ctxT(t), map[string]any{"type": "kick", "target": f.c.Pubkey()})
	if err != nil {
		t.Fatal(err)
	}
	_ = fr.Decode(&ack)
	if ack.Type != "kick_ack" || len(ack.Kicked) != 1 || len(ack.SkippedControlPlane) != 1 {
		t.Fatalf("%s", fr.Raw)
	}
	<-cs.Done()
	if ce := cs.CloseError(); ce == nil || ce.Code != 4001 || ce.Text != "kicked" {
		t.Fatalf("kick close %+v", ce)
	}
	select {
	case <-carol.Done():
		t.Fatal("kick closed a control-plane socket")
	default:
	}
}

// 03 §12 scenarios 20-23: list_peers, set_visible, set_profile, set_summary.
func TestPresenceMessages(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	sess := client.NewSession()
	bobSession := b.connect(f.b, client.Options{Session: &sess})
	bob := b.connect(f.b, client.Options{SessionID: "bob-daemon"})
	fr, err := alice.Request(ctxT(t), map[string]any{"type": "list_peers"})
	if err != nil {
		t.Fatal(err)
	}
	var pl protocol.PeersList
	_ = fr.Decode(&pl)
	if pl.ReqID == "" || len(pl.Peers) != 3 || pl.Peers[0].MemberPubkey != f.a.Pubkey() || pl.Peers[0].Summary != nil || pl.Peers[0].Profile != nil || pl.Peers[0].Stats != nil {
		t.Fatalf("%s", fr.Raw)
	}
	if _, err := time.Parse(protocol.ISOLayout, pl.Peers[0].ConnectedAt); err != nil {
		t.Fatal(err)
	}
	fr, err = bob.Request(ctxT(t), map[string]any{"type": "set_visible", "visible": false})
	var vack protocol.Ack
	_ = fr.Decode(&vack)
	if err != nil || vack.Type != "ack" || vack.ID == "" || vack.ID != vack.ReqID || vack.Queued || vack.MessageID != "" || vack.Error != "" {
		t.Fatalf("set_visible ack %s %v", fr.Raw, err)
	}
	hidden := decodePush(t, waitFrame(t, alice, 10*time.Second, isEvent("peer_hidden")))
	if hidden.SenderPubkey != "system" || !strings.Contains(string(hidden.EventData), f.b.Pubkey()) {
		t.Fatalf("peer_hidden %+v", hidden)
	}
	waitFrame(t, bobSession, 10*time.Second, isEvent("peer_hidden")) // siblings hear it too
	peers, _ := alice.ListPeers(ctxT(t))
	for _, p := range peers {
		if p.Pubkey == f.b.Pubkey() {
			t.Fatal("hidden peer listed to another member")
		}
	}
	peers, _ = bobSession.ListPeers(ctxT(t))
	found := false
	for _, p := range peers {
		if p.Pubkey == f.b.Pubkey() && p.Visible != nil && !*p.Visible {
			found = true
		}
	}
	if !found {
		t.Fatal("hidden peer not listed to its own member's session")
	}
	if _, err := alice.Request(ctxT(t), map[string]any{"type": "set_profile", "title": "lead"}); err != nil {
		t.Fatal(err)
	}
	if _, err := alice.Request(ctxT(t), map[string]any{"type": "set_profile", "bio": "x"}); err != nil {
		t.Fatal(err)
	}
	_ = alice.WriteJSON(map[string]any{"type": "set_summary", "summary": "refactoring"})
	_ = alice.WriteJSON(map[string]any{"type": "set_stats", "stats": map[string]any{"messagesIn": 3}})
	_, _ = alice.ListPeers(ctxT(t))
	peers, _ = bobSession.ListPeers(ctxT(t))
	for _, p := range peers {
		if p.Pubkey == f.a.Pubkey() {
			if string(p.Profile) != `{"bio":"x","title":"lead"}` || p.Summary == nil || *p.Summary != "refactoring" || string(p.Stats) != `{"messagesIn":3}` {
				t.Fatalf("alice as listed: %+v profile=%s stats=%s", p, p.Profile, p.Stats)
			}
			return
		}
	}
	t.Fatal("alice not listed")
}
