package main

import (
	"encoding/json"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/internal/clienttest"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// Continuous presence (01 §6-§8, §14 scenarios 9-13, 15, 17): a transient
// reconnect is invisible; only lease expiry evicts, exactly once.

func withLease(d time.Duration) func(*config.Config) {
	return func(c *config.Config) { c.LeaseTTL = d }
}

func (b *testBroker) auditCount(meshID, event string) int64 {
	var n int64
	b.query(&n, "SELECT count(*) FROM {audit_log} WHERE mesh_id = ? AND event_type = ?", meshID, event)
	return n
}

func (b *testBroker) presenceRow(id string) (disconnected *time.Time, lastPing time.Time) {
	b.t.Helper()
	var rows []struct {
		DisconnectedAt *time.Time
		LastPingAt     time.Time
	}
	b.query(&rows, "SELECT disconnected_at, last_ping_at FROM {presence} WHERE id = ?", id)
	if len(rows) != 1 {
		b.t.Fatalf("presence %s: %d rows", id, len(rows))
	}
	return rows[0].DisconnectedAt, rows[0].LastPingAt
}

// Scenarios 9 and 10, and the design's first case: a socket killed without
// a close frame comes back inside the lease; nobody sees it leave or join,
// and the DM sent during the gap arrives once, after the ack.
func TestSilentReattachSession(t *testing.T) {
	t.Parallel()
	// The reconnect must land inside the lease, after a send and a database
	// wait: a 1 s lease ran out first on a loaded machine.
	b := startTestBroker(t, withLease(10*time.Second))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	daemon := b.connect(f.a, client.Options{SessionID: "daemon"})
	sess := client.NewSession()
	s := b.connect(f.a, client.Options{Session: &sess, SessionID: "claude-1"})
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	waitFor(t, 10*time.Second, "audit joins", func() bool { return b.auditCount(f.meshID, "peer_joined") == 3 })
	before := b.presence.MeshCount(f.meshID)
	closedAt := time.Now()

	s.Kill()
	n, c := sealTo(t, f.b.Key, pub(sess.Key), "during the gap")
	ack, err := bob.Send(ctxT(t), client.SendRequest{TargetSpec: sess.Pubkey(), Priority: "next", Nonce: n, Ciphertext: c})
	if err != nil || !ack.Queued {
		t.Fatalf("DM during grace: %+v %v", ack, err)
	}
	waitFor(t, 10*time.Second, "peer_state saved at close", func() bool {
		var seen []*time.Time
		b.query(&seen, "SELECT last_seen_at FROM {peer_state} WHERE member_id = ?", f.a.MemberID)
		return len(seen) == 1 && seen[0] != nil && !seen[0].Before(closedAt.Add(-time.Second))
	})
	if disc, _ := b.presenceRow(s.HelloAck.PresenceID); disc != nil {
		t.Fatal("grace wrote disconnected_at")
	}

	again := b.connect(f.a, client.Options{Session: &sess, SessionID: "claude-1"})
	if again.HelloAck.PresenceID != s.HelloAck.PresenceID {
		t.Fatalf("reattach got presence %s, want %s", again.HelloAck.PresenceID, s.HelloAck.PresenceID)
	}
	var raw map[string]json.RawMessage
	_ = json.Unmarshal(again.AckRaw, &raw)
	if _, ok := raw["memberProfile"]; ok {
		t.Fatalf("silent session reattach ack has memberProfile: %s", again.AckRaw)
	}
	p := decodePush(t, waitFrame(t, again, 10*time.Second, isMessage))
	if p.MessageID != ack.MessageID {
		t.Fatalf("got %s want %s", p.MessageID, ack.MessageID)
	}
	if dup := collect(again, 200*time.Millisecond, isMessage); len(dup) != 0 {
		t.Fatalf("DM pushed twice")
	}
	for _, c := range []*client.Client{bob, daemon} {
		for _, fr := range collect(c, 50*time.Millisecond, func(fr client.Frame) bool { return isEvent("peer_left")(fr) || isEvent("peer_joined")(fr) }) {
			if decodePush(t, fr).Event == "peer_left" || json.Valid(fr.Raw) && contains([]string{string(fr.Raw)}, sess.Pubkey()) {
				t.Fatalf("flap visible: %s", fr.Raw)
			}
		}
	}
	var rows int64
	b.query(&rows, "SELECT count(*) FROM {presence} WHERE session_pubkey = ?", sess.Pubkey())
	if rows != 1 || b.presence.MeshCount(f.meshID) != before {
		t.Fatalf("reattach inserted a row (%d) or moved the count", rows)
	}
	waitFor(t, 10*time.Second, "restorePresence", func() bool {
		disc, ping := b.presenceRow(s.HelloAck.PresenceID)
		return disc == nil && !ping.Before(closedAt.Add(-time.Millisecond))
	})
	if n := b.auditCount(f.meshID, "peer_joined"); n != 3 {
		t.Fatalf("reattach audited: %d joins", n)
	}
}

// Scenario 11: member hello reattach by session id and member key; another
// session id is a fresh presence and the old lease later leaves.
func TestSilentReattachMember(t *testing.T) {
	t.Parallel()
	// The reconnect must land inside the lease: 300 ms, then 3 s, were less
	// than a kill, an offline wait and a hello took on a busy machine. The
	// old lease must still run out within the wait for peer_left below.
	b := startTestBroker(t, withLease(10*time.Second))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	d := b.connect(f.a, client.Options{SessionID: "daemon-1"})
	d.Kill()
	b.waitOffline(d.HelloAck.PresenceID)
	again := b.connect(f.a, client.Options{SessionID: "daemon-1"})
	if again.HelloAck.PresenceID != d.HelloAck.PresenceID || again.HelloAck.Restored || again.HelloAck.MemberProfile == nil {
		t.Fatalf("member reattach ack %s", again.AckRaw)
	}
	again.Kill()
	b.waitOffline(again.HelloAck.PresenceID)
	// peer_returned needs the member's saved peer_state, written in the
	// background after a close; on a loaded Postgres it was not there yet
	// and the new session was announced as peer_joined.
	waitFor(t, 10*time.Second, "peer_state saved at close", func() bool {
		var n int64
		b.query(&n, "SELECT count(*) FROM {peer_state} WHERE member_id = ? AND last_seen_at IS NOT NULL", f.a.MemberID)
		return n == 1
	})
	other := b.connect(f.a, client.Options{SessionID: "daemon-2"})
	if other.HelloAck.PresenceID == d.HelloAck.PresenceID {
		t.Fatal("another session id reattached")
	}
	// The old lease may run out before the new hello completes on a busy
	// machine, so the two events come in either order.
	events := waitEvents(t, bob, 60*time.Second, "peer_returned", "peer_left")
	left := decodePush(t, events["peer_left"])
	if !json.Valid(left.EventData) {
		t.Fatal(left)
	}
}

// Scenario 13 and the design's second case: past the lease, exactly one
// peer_left to other members, none to the member's own sockets, full
// cleanup; a later hello is a new presence with one join.
func TestLeaseExpiresOnce(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(150*time.Millisecond))
	f := b.fixture()
	var cleanups atomic.Int32
	b.presence.OnEvict("test-counter", func(c *services.Conn, _ services.EvictReason) {
		if c.MemberID == f.a.MemberID && c.Role == services.RoleSession {
			cleanups.Add(1)
		}
	})
	bob := b.connect(f.b, client.Options{})
	daemon := b.connect(f.a, client.Options{SessionID: "daemon"})
	sess := client.NewSession()
	s := b.connect(f.a, client.Options{Session: &sess})
	s.Kill()
	left := decodePush(t, waitFrame(t, bob, 10*time.Second, isEvent("peer_left")))
	var data struct{ Name, Pubkey string }
	_ = json.Unmarshal(left.EventData, &data)
	if data.Pubkey != sess.Pubkey() || data.Name != "alice" {
		t.Fatalf("peer_left %s", left.EventData)
	}
	if more := collect(bob, 300*time.Millisecond, isEvent("peer_left")); len(more) != 0 {
		t.Fatal("peer_left twice")
	}
	if got := collect(daemon, 10*time.Millisecond, isEvent("peer_left")); len(got) != 0 {
		t.Fatal("same member's socket got peer_left")
	}
	if disc, _ := b.presenceRow(s.HelloAck.PresenceID); disc == nil {
		t.Fatal("eviction did not set disconnected_at")
	}
	waitFor(t, 10*time.Second, "audit peer_left", func() bool { return b.auditCount(f.meshID, "peer_left") == 1 })
	if cleanups.Load() != 1 {
		t.Fatalf("cleanup ran %d times", cleanups.Load())
	}
	back := b.connect(f.a, client.Options{Session: &sess})
	if back.HelloAck.PresenceID == s.HelloAck.PresenceID {
		t.Fatal("evicted lease reattached")
	}
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	if joins := collect(bob, 200*time.Millisecond, isEvent("peer_joined")); len(joins) != 0 {
		t.Fatalf("%d joins on return", 1+len(joins))
	}
}

// Scenario 12: the DB sweeper flips a stale row during grace; the reattach
// clears it again.
func TestSweeperAndRestorePresence(t *testing.T) {
	t.Parallel()
	// The reattach must land inside the lease, after the sweeper's wait.
	b := startTestBroker(t, withLease(30*time.Second), func(c *config.Config) { c.StaleSweep = 20 * time.Millisecond })
	f := b.fixture()
	sess := client.NewSession()
	s := b.connect(f.a, client.Options{Session: &sess})
	s.Kill()
	b.exec("UPDATE {presence} SET last_ping_at = ? WHERE id = ?", time.Now().UTC().Add(-120*time.Second), s.HelloAck.PresenceID)
	waitFor(t, 10*time.Second, "sweeper", func() bool { d, _ := b.presenceRow(s.HelloAck.PresenceID); return d != nil })
	again := b.connect(f.a, client.Options{Session: &sess})
	if again.HelloAck.PresenceID != s.HelloAck.PresenceID {
		t.Fatal("no reattach")
	}
	waitFor(t, 10*time.Second, "restorePresence", func() bool { d, _ := b.presenceRow(s.HelloAck.PresenceID); return d == nil })
}

// Scenario 15 and the design's third case: a client that stops answering
// pings is terminated, enters grace, and can reattach.
func TestStalledClientWatchdog(t *testing.T) {
	t.Parallel()
	// A healthy client has PongTimeout to answer: a second is ten times
	// more than a pong takes on a busy machine under -race, and pings every
	// 50 ms still give the stalled client twenty chances to answer.
	const ping, pongTimeout = 50 * time.Millisecond, time.Second
	b := startTestBroker(t, withLease(30*time.Second), func(c *config.Config) {
		c.PingInterval, c.PongTimeout = ping, pongTimeout
	})
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	sess := client.NewSession()
	healthy := b.connect(f.c, client.Options{})
	stalled := b.connect(f.a, clienttest.NoPong(client.Options{Session: &sess}))
	select {
	case <-stalled.Done():
	case <-time.After(20 * pongTimeout):
		t.Fatal("stalled client not terminated")
	}
	if ce := stalled.CloseError(); ce != nil && ce.Code != 1006 {
		t.Fatalf("terminate sent a close frame %+v; want none (1006)", ce)
	}
	// The healthy client connected first, so by now it has lived through
	// a whole PongTimeout on pongs alone; give it another one.
	select {
	case <-healthy.Done():
		t.Fatal("a client answering pings was terminated")
	case <-time.After(pongTimeout):
	}
	if got := collect(bob, 10*time.Millisecond, isEvent("peer_left")); len(got) != 0 {
		t.Fatal("watchdog terminate was not a grace")
	}
	again := b.connect(f.a, client.Options{Session: &sess})
	if again.HelloAck.PresenceID != stalled.HelloAck.PresenceID {
		t.Fatal("no reattach after watchdog")
	}
}

// The design's fourth case: DMs of every priority sent during grace are
// queued and delivered in order on reattach, even while the session's
// status would hold next and low.
func TestEveryPriorityDuringGrace(t *testing.T) {
	t.Parallel()
	// The reattach must land inside the lease, after five sends.
	b := startTestBroker(t, withLease(30*time.Second))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	sess, _ := b.graceSession(f.a) // the broker has seen the socket go
	var ids []string
	for _, prio := range []string{"low", "now", "next", "now", "low"} {
		n, c := sealTo(t, f.b.Key, pub(sess.Key), prio)
		ack, err := bob.Send(ctxT(t), client.SendRequest{TargetSpec: sess.Pubkey(), Priority: client.Priority(prio), Nonce: n, Ciphertext: c})
		if err != nil || !ack.Queued {
			t.Fatal(ack, err)
		}
		ids = append(ids, ack.MessageID)
	}
	var claimed int64
	b.query(&claimed, "SELECT count(*) FROM {message_queue} WHERE target_spec = ? AND claimed_at IS NOT NULL", sess.Pubkey())
	if claimed != 0 {
		t.Fatalf("%d rows claimed while the socket was down (D2)", claimed)
	}
	again := b.connect(f.a, client.Options{Session: &sess})
	for i, want := range ids {
		if p := decodePush(t, waitFrame(t, again, 10*time.Second, isMessage)); p.MessageID != want {
			t.Fatalf("push %d is %s, want %s", i, p.MessageID, want)
		}
	}
}

// Scenario 17 and the design's fifth case (H6): a session hello for a key
// that is still online takes the lease over without a flap, and the old
// socket's close is ignored.
func TestTakeoverWhileOnline(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(150*time.Millisecond))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	sess := client.NewSession()
	x := b.connect(f.a, client.Options{Session: &sess, SessionID: "s"})
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	y := b.connect(f.a, client.Options{Session: &sess, SessionID: "s"})
	<-x.Done()
	if ce := x.CloseError(); ce == nil || ce.Code != 1000 || ce.Text != "session_replaced" {
		t.Fatalf("old socket close %+v", ce)
	}
	if y.HelloAck.PresenceID != x.HelloAck.PresenceID {
		t.Fatal("takeover changed the presence")
	}
	if got := collect(bob, 500*time.Millisecond, func(fr client.Frame) bool { return isEvent("peer_left")(fr) || isEvent("peer_joined")(fr) }); len(got) != 0 {
		t.Fatalf("takeover flapped: %s", got[0].Raw)
	}
	if !b.presence.Online(b.presence.Get(y.HelloAck.PresenceID)) {
		t.Fatal("the new socket is not the live one")
	}
}

// Two sessions of one member, one in grace: the other keeps working and
// DMs to the member key go to the live one.
func TestTwoSessionsOneInGrace(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(5*time.Second))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	s1, s2 := client.NewSession(), client.NewSession()
	c1 := b.connect(f.a, client.Options{Session: &s1})
	c2 := b.connect(f.a, client.Options{Session: &s2})
	c1.Kill()
	ack, _ := bob.Send(ctxT(t), client.SendRequest{TargetSpec: f.a.Pubkey(), Priority: "now", Nonce: "", Ciphertext: "x"})
	if p := decodePush(t, waitFrame(t, c2, 10*time.Second, isMessage)); p.MessageID != ack.MessageID {
		t.Fatal("member-key DM not delivered to the live session")
	}
	back := b.connect(f.a, client.Options{Session: &s1})
	if got := collect(back, 200*time.Millisecond, isMessage); len(got) != 0 {
		t.Fatal("member-key DM delivered twice")
	}
}

// Many sessions flapping at once leave no timers or goroutines behind and
// every one of them reattaches.
func TestManySessionsFlapping(t *testing.T) {
	// Not parallel: it counts the whole process's goroutines.
	b := startTestBroker(t, withLease(20*time.Second))
	f := b.fixture()
	base := runtime.NumGoroutine()
	const n = 40
	sessions := make([]client.Session, n)
	first := make([]*client.Client, n)
	for i := range sessions {
		sessions[i] = client.NewSession()
		first[i] = b.connect(f.a, client.Options{Session: &sessions[i]})
	}
	for round := range 3 {
		var wg sync.WaitGroup
		for i := range sessions {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if round == 0 {
					first[i].Kill()
				}
				c, err := b.tryConnect(f.a, client.Options{Session: &sessions[i]})
				if err != nil {
					t.Error(err)
					return
				}
				if c.HelloAck.PresenceID != first[i].HelloAck.PresenceID {
					t.Errorf("session %d got a new presence", i)
				}
				c.Kill()
			}()
		}
		wg.Wait()
	}
	if got := b.presence.MeshCount(f.meshID); got != n {
		t.Fatalf("registry has %d entries, want %d", got, n)
	}
	goroutinesSettle(t, base, 10)
}

// A reattach racing the eviction timer is either a silent reattach or a
// clean leave-then-join: never both, never neither.
//
// The 30 rounds (each a millisecond later than the last against the same
// lease) are split across three brokers that run at once; a round only
// waits, so this keeps the test's reach and cuts its wall time.
func TestReattachRacingEviction(t *testing.T) {
	t.Parallel()
	const lease, rounds, brokers = 40 * time.Millisecond, 30, 3
	for k := range brokers {
		t.Run(fmt.Sprint("broker", k), func(t *testing.T) {
			t.Parallel()
			b := startTestBroker(t, withLease(lease))
			f := b.fixture()
			bob := b.connect(f.b, client.Options{})
			for i := k; i < rounds; i += brokers {
				reattachRacingEvictionRound(t, b, f, bob, lease, i)
			}
		})
	}
}

// reattachRacingEvictionRound kills a session and reconnects it i ms
// before the lease would have expired (or after, from i = 15).
func reattachRacingEvictionRound(t *testing.T, b *testBroker, f fixture, bob *client.Client, lease time.Duration, i int) {
	t.Helper()
	sess := client.NewSession()
	s := b.connect(f.a, client.Options{Session: &sess})
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	s.Kill()
	time.Sleep(lease - 15*time.Millisecond + time.Duration(i)*time.Millisecond)
	again := b.connect(f.a, client.Options{Session: &sess})
	flap := func(fr client.Frame) bool { return isEvent("peer_left")(fr) || isEvent("peer_joined")(fr) }
	silent := again.HelloAck.PresenceID == s.HelloAck.PresenceID
	var events []client.Frame
	if !silent { // a leave and a join must come, however late
		events = append(events, waitFrame(t, bob, 10*time.Second, flap), waitFrame(t, bob, 10*time.Second, flap))
	}
	events = append(events, collect(bob, 150*time.Millisecond, flap)...)
	var kinds []string
	for _, e := range events {
		kinds = append(kinds, decodePush(t, e).Event)
	}
	switch {
	case silent && len(kinds) == 0:
	case !silent && fmt.Sprint(kinds) == "[peer_left peer_joined]":
	default:
		t.Fatalf("round %d: silent=%v events=%v", i, silent, kinds)
	}
	again.Kill()
	waitFrame(t, bob, 10*time.Second, isEvent("peer_left"))
}

// H7 and the design's sixth case: a resume token reattaches without the
// attestation round trip; a forged or foreign one is ignored and the hello
// is judged on its own.
func TestResumeToken(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(30*time.Second))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	sess := client.NewSession()
	s := b.connect(f.a, client.Options{Session: &sess})
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	token := s.HelloAck.ResumeToken
	if !strings.HasPrefix(token, "mesh-resume.v1.") {
		t.Fatalf("no resume token in %s", s.AckRaw)
	}
	if plain := b.connect(f.c, client.Options{}); !strings.HasPrefix(plain.HelloAck.ResumeToken, "mesh-resume.v1.") {
		t.Fatal("a member socket got no token (bound to its member key)")
	}
	s.Kill()
	bare := func(tok string) client.Options {
		return clienttest.Mutate(client.Options{Session: &sess}, func(m map[string]any) {
			for _, k := range []string{"signature", "parentAttestation", "timestamp"} {
				delete(m, k)
			}
			m["resumeToken"] = tok
		})
	}
	// Forged: the token's signature is not the broker's. Without the usual
	// proofs the hello is rejected, and the lease is untouched.
	forged := token[:strings.LastIndexByte(token, '.')+1] + strings.Repeat("A", 86)
	rejected(t, b, f.a, bare(forged), "attestation_mismatch", 1008, "parentAttestation")
	// Another mesh's token does not resume here either.
	other := b.fixture()
	rejected(t, b, f.a, clienttest.Mutate(client.Options{Session: &sess}, func(m map[string]any) {
		m["meshId"] = other.meshID
		delete(m, "signature")
		m["resumeToken"] = token
	}), "malformed", 1008, "session_hello rejected")
	// A genuine token resumes with no signature at all.
	again := b.connect(f.a, bare(token))
	if again.HelloAck.PresenceID != s.HelloAck.PresenceID || again.HelloAck.ResumeToken == "" {
		t.Fatalf("resume: %s", again.AckRaw)
	}
	if got := collect(bob, 100*time.Millisecond, func(fr client.Frame) bool {
		return (isEvent("peer_left")(fr) || isEvent("peer_joined")(fr)) && strings.Contains(string(fr.Raw), sess.Pubkey())
	}); len(got) != 0 {
		t.Fatalf("resume flapped: %s", got[0].Raw)
	}
	// A forged token on an otherwise valid hello is just a fresh hello.
	again.Kill()
	normal := b.connect(f.a, client.Options{Session: &sess, ResumeToken: forged})
	if normal.HelloAck.PresenceID != s.HelloAck.PresenceID {
		t.Fatal("identity reattach failed with a forged token attached")
	}
}

// A reattach is admitted on its lease's member row, with no member query
// before hello_ack. A member the web app revoked while the session was away
// is checked right after: it gets the rejection its hello would have got,
// and the presence ends, announced once.
func TestReattachOfRevokedMemberEnds(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(30*time.Second))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	sess, pid := b.graceSession(f.a)
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))

	b.exec("UPDATE {member} SET revoked_at = ? WHERE id = ?", time.Now().UTC(), f.a.MemberID)
	b.advance(10 * time.Second) // past the member cache: the check reads the database

	again := b.connect(f.a, client.Options{Session: &sess})
	if e := reattachEnded(t, b, again, pid, protocol.CodeRevoked); !strings.HasPrefix(e.Message, "You've been removed") {
		t.Fatalf("rejection %q", e.Message)
	}
	if ce := again.CloseError(); ce == nil || ce.Code != 4002 {
		t.Fatalf("close %+v, want 4002", ce)
	}
	waitFrame(t, bob, 10*time.Second, isEvent("peer_left"))
	if got := collect(bob, 200*time.Millisecond, isEvent("peer_left")); len(got) != 0 {
		t.Fatalf("peer_left announced %d more times", len(got))
	}
	rejected(t, b, f.a, client.Options{Session: &sess}, "revoked", 4002, "You've been removed")
}

// Sessions of one member closing at once each add their stats to the
// member's running totals in peer_state; none is lost to another's save.
func TestPeerStateStatsAddUpAcrossSessions(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(time.Hour))
	f := b.fixture()
	const n = 8
	socks := make([]*client.Client, n)
	for i := range socks {
		s := client.NewSession()
		socks[i] = b.connect(f.a, client.Options{Session: &s})
		_ = socks[i].WriteJSON(map[string]any{"type": "set_stats", "stats": map[string]any{"messagesIn": i + 1, "errors": 1}})
		_, _ = socks[i].ListPeers(ctxT(t)) // set_stats is answered by nothing; this orders after it
	}
	var wg sync.WaitGroup
	for _, c := range socks {
		wg.Go(c.Kill)
	}
	wg.Wait()
	var got string
	waitFor(t, 10*time.Second, "all eight saves", func() bool {
		var rows []string
		b.query(&rows, "SELECT cumulative_stats FROM {peer_state} WHERE member_id = ?", f.a.MemberID)
		if len(rows) != 1 {
			return false
		}
		got = rows[0]
		var stats map[string]float64
		return json.Unmarshal([]byte(got), &stats) == nil && stats["errors"] == n
	})
	var stats map[string]float64
	_ = json.Unmarshal([]byte(got), &stats)
	if stats["messagesIn"] != n*(n+1)/2 {
		t.Fatalf("cumulative stats %s, want messagesIn %d", got, n*(n+1)/2)
	}
}

// A member deleted and created again under the same key while its session
// was away is another member: the reattach is ended as unauthorized.
func TestReattachOfRecreatedMemberEnds(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(30*time.Second))
	f := b.fixture()
	sess, pid := b.graceSession(f.b)

	b.exec("DELETE FROM {member} WHERE id = ?", f.b.MemberID)
	if _, err := services.NewProvisionService(b.db, time.Now).AddMember(ctxT(t), f.meshID, f.b.Pubkey(), "bob again", "member"); err != nil {
		t.Fatal(err)
	}
	b.advance(10 * time.Second) // past the member cache

	again := b.connect(f.b, client.Options{Session: &sess})
	reattachEnded(t, b, again, pid, protocol.CodeUnauthorized)
}

// graceSession connects a new session of id, drops its socket without a
// close frame and waits until the broker holds the lease offline.
func (b *testBroker) graceSession(id client.Identity) (client.Session, string) {
	b.t.Helper()
	sess := client.NewSession()
	s := b.connect(id, client.Options{Session: &sess})
	s.Kill()
	b.waitOffline(s.HelloAck.PresenceID)
	return sess, s.HelloAck.PresenceID
}

// reattachEnded checks that c reattached to presence pid and was then
// ended by the member recheck: an error frame with code, the socket
// closed, the presence gone. It returns the error frame.
func reattachEnded(t *testing.T, b *testBroker, c *client.Client, pid string, code protocol.Code) protocol.ErrorFrame {
	t.Helper()
	if c.HelloAck.PresenceID != pid {
		t.Fatalf("reattach got presence %s, want %s", c.HelloAck.PresenceID, pid)
	}
	fr := waitFrame(t, c, 10*time.Second, func(f client.Frame) bool { return f.Type == "error" })
	var e protocol.ErrorFrame
	if err := fr.Decode(&e); err != nil || e.Code != code {
		t.Fatalf("error frame %s, want code %s", fr.Raw, code)
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("socket not closed")
	}
	waitFor(t, 10*time.Second, "presence ended", func() bool { return b.presence.Get(pid) == nil })
	return e
}
