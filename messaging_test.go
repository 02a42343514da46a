package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/protocol"
)

// msgFixture is 02 §12's: a1 (A via session hello), b1 and b2 (B's
// sessions), bd (B's daemon, plain hello), c1 (C, plain hello).
type msgFixture struct {
	fixture
	sa1, sb1, sb2      client.Session
	a1, b1, b2, bd, c1 *client.Client
}

func (b *testBroker) msgFixture() *msgFixture {
	b.t.Helper()
	m := &msgFixture{fixture: b.fixture(), sa1: client.NewSession(), sb1: client.NewSession(), sb2: client.NewSession()}
	m.a1 = b.connect(m.a, client.Options{Session: &m.sa1, SessionID: "a1", Cwd: "/a1"})
	m.b1 = b.connect(m.b, client.Options{Session: &m.sb1, SessionID: "b1", Cwd: "/b1", DisplayName: "bob-1"})
	m.b2 = b.connect(m.b, client.Options{Session: &m.sb2, SessionID: "b2", Cwd: "/b2"})
	m.bd = b.connect(m.b, client.Options{SessionID: "daemon-b", Cwd: "/bd"})
	m.c1 = b.connect(m.c, client.Options{SessionID: "c1", Cwd: "/c1"})
	return m
}

func dm(t *testing.T, from *client.Client, fromKey client.Session, to client.Session, priority, body string) protocol.Ack {
	t.Helper()
	n, c := sealTo(t, fromKey.Key, pub(to.Key), body)
	ack, err := from.Send(ctxT(t), client.SendRequest{TargetSpec: to.Pubkey(), Priority: client.Priority(priority), Nonce: n, Ciphertext: c})
	if err != nil {
		t.Fatal(err)
	}
	return ack
}

type queueRow struct {
	ID                  string
	TargetSpec          string
	SenderSessionPubkey *string
	Priority            string
	DeliveredAt         *time.Time
	ClaimID             *string
	ClaimedAt           *time.Time
	ClaimExpiresAt      *time.Time
	ClientMessageID     *string
}

func (b *testBroker) row(id string) queueRow {
	b.t.Helper()
	var rows []queueRow
	b.query(&rows, "SELECT id, target_spec, sender_session_pubkey, priority, delivered_at, claim_id, claimed_at, claim_expires_at, client_message_id FROM {message_queue} WHERE id = ?", id)
	if len(rows) != 1 {
		b.t.Fatalf("row %s: %d rows", id, len(rows))
	}
	return rows[0]
}

func (b *testBroker) countRows(meshID string) int64 {
	var n int64
	b.query(&n, "SELECT count(*) FROM {message_queue} WHERE mesh_id = ?", meshID)
	return n
}

// 02 §12 scenarios 1-3: accept, ack, deliver exactly to the target, close by
// client_ack; a foreign ack changes nothing.
func TestDirectMessageLifecycle(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	// b1 acks, so its rows wait for client_ack instead of being closed by
	// the pong that confirms the push (M3).
	_ = m.b1.ClientAck("", "warm-up")
	_, _ = m.b1.ListPeers(ctxT(t))
	n, c := sealTo(t, m.sa1.Key, pub(m.sb1.Key), "hello b1")
	ack, err := m.a1.Send(ctxT(t), client.SendRequest{ID: "x1", TargetSpec: m.sb1.Pubkey(), Priority: "now", Nonce: n, Ciphertext: c})
	if err != nil || ack.ID != "x1" || !ack.Queued || len(ack.MessageID) != 32 || ack.Error != "" {
		t.Fatalf("ack %+v %v", ack, err)
	}
	f := waitFrame(t, m.b1, 10*time.Second, isMessage)
	want := fmt.Sprintf(`{"type":"push","messageId":%q,"meshId":%q,"senderPubkey":%q,"priority":"now","nonce":%q,"ciphertext":%q,"createdAt":`,
		ack.MessageID, m.meshID, m.sa1.Pubkey(), n, c)
	if !strings.HasPrefix(string(f.Raw), want) || strings.Count(string(f.Raw), ",") != 7 {
		t.Fatalf("push\n got %s\nwant %s...}", f.Raw, want)
	}
	p := decodePush(t, f)
	if body, err := client.Open(p.Nonce, p.Ciphertext, pub(m.sa1.Key), m.sb1.Key); err != nil || string(body) != "hello b1" {
		t.Fatalf("body %q %v", body, err)
	}
	r := b.row(ack.MessageID)
	if r.TargetSpec != m.sb1.Pubkey() || r.SenderSessionPubkey == nil || *r.SenderSessionPubkey != m.sa1.Pubkey() || r.Priority != "now" ||
		r.DeliveredAt != nil || r.ClaimID == nil || *r.ClaimID != m.b1.HelloAck.PresenceID || r.ClaimExpiresAt.Sub(*r.ClaimedAt) != b.cfg.ClaimLease {
		t.Fatalf("row %+v", r)
	}
	for _, other := range []*client.Client{m.b2, m.bd, m.c1} {
		if got := collect(other, 50*time.Millisecond, isMessage); len(got) != 0 {
			t.Fatalf("a non-target got %s", got[0].Raw)
		}
	}
	// A foreign client_ack (C may not close a row for SB1) changes nothing.
	_ = m.c1.ClientAck(ack.MessageID, "")
	_, _ = m.c1.ListPeers(ctxT(t)) // frames of one socket are handled in order
	if b.row(ack.MessageID).DeliveredAt != nil {
		t.Fatal("foreign ack closed the row")
	}
	_ = m.b1.ClientAck(ack.MessageID, "")
	waitFor(t, 10*time.Second, "delivered_at", func() bool { return b.row(ack.MessageID).DeliveredAt != nil })
	// Another DM makes b1 drain again: the acked one is not pushed twice.
	dm(t, m.a1, m.sa1, m.sb1, "now", "second")
	for _, f := range collect(m.b1, 200*time.Millisecond, isMessage) {
		if decodePush(t, f).MessageID == ack.MessageID {
			t.Fatal("acked message pushed again")
		}
	}
}

// 02 §12 scenario 4 [GO-D4]: a client that never acks and stays connected
// never sees a message twice; the row is marked delivered at lease expiry.
func TestNonAckingClientExactlyOnce(t *testing.T) {
	t.Parallel()
	// The push is confirmed by the pong to a ping PushConfirmDelay after it;
	// only a confirmed push is marked delivered at claim expiry (an
	// unconfirmed one is pushed again). The claim outlasts the confirmation
	// by far: a 200 ms claim lost that race on a loaded machine.
	b := startTestBroker(t, func(c *config.Config) {
		c.ClaimLease = 1500 * time.Millisecond
		c.PushConfirmDelay = 10 * time.Millisecond
		c.ClaimReapInterval = 20 * time.Millisecond
	})
	m := b.msgFixture()
	first := dm(t, m.a1, m.sa1, m.sb1, "now", "one")
	waitFrame(t, m.b1, 10*time.Second, isMessage)
	waitFor(t, 15*time.Second, "delivered at claim expiry", func() bool { return b.row(first.MessageID).DeliveredAt != nil })
	dm(t, m.a1, m.sa1, m.sb1, "now", "two")
	seen := map[string]int{decodePush(t, waitFrame(t, m.b1, 10*time.Second, isMessage)).MessageID: 1}
	for _, f := range collect(m.b1, 500*time.Millisecond, isMessage) {
		seen[decodePush(t, f).MessageID]++
	}
	if seen[first.MessageID] != 0 || len(seen) != 1 {
		t.Fatalf("pushes after expiry: %v", seen)
	}
}

// M3: a client that acks gets every message until it acks it, also on its
// next connection.
func TestAckingClientRedeliveredOnNextConnection(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(30*time.Second)) // the next connection reattaches
	m := b.msgFixture()
	_ = m.b1.ClientAck("", "warm-up") // marks b1 as a client that acks
	_, _ = m.b1.ListPeers(ctxT(t))    // the ack above is processed before the push's pong
	ack := dm(t, m.a1, m.sa1, m.sb1, "now", "important")
	waitFrame(t, m.b1, 10*time.Second, isMessage)
	m.b1.Kill() // dies before acking
	again := b.connect(m.b, client.Options{Session: &m.sb1, SessionID: "b1"})
	p := decodePush(t, waitFrame(t, again, 10*time.Second, isMessage))
	if p.MessageID != ack.MessageID {
		t.Fatalf("got %s, want the unacked %s again", p.MessageID, ack.MessageID)
	}
	_ = again.ClientAck(p.MessageID, "")
	waitFor(t, 10*time.Second, "delivered", func() bool { return b.row(ack.MessageID).DeliveredAt != nil })
}

// 02 §12 scenario 5: 50 DMs to B's member key reach B's connections exactly
// once in total.
func TestMemberTargetManyConnections(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	var wg sync.WaitGroup
	acks := make(chan protocol.Ack, 50)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, c := sealTo(t, m.sa1.Key, pub(m.b.Key), fmt.Sprint(i))
			ack, err := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: m.b.Pubkey(), Priority: "now", Nonce: n, Ciphertext: c})
			if err != nil || !ack.Queued {
				t.Errorf("send %d: %+v %v", i, ack, err)
			}
			acks <- ack
		}()
	}
	wg.Wait()
	close(acks)
	want := map[string]bool{}
	for a := range acks {
		want[a.MessageID] = true
	}
	seen := map[string]int{}
	gather := func(d time.Duration) {
		for _, c := range []*client.Client{m.b1, m.b2, m.bd} {
			for _, f := range collect(c, d, isMessage) {
				seen[decodePush(t, f).MessageID]++
			}
		}
	}
	// Every DM must arrive, however long that takes; then a while more
	// for any second delivery.
	for deadline := time.Now().Add(30 * time.Second); len(seen) < 50 && time.Now().Before(deadline); {
		gather(20 * time.Millisecond)
	}
	gather(300 * time.Millisecond)
	if len(seen) != 50 {
		t.Fatalf("%d distinct messages delivered, want 50", len(seen))
	}
	for id, n := range seen {
		if n != 1 || !want[id] {
			t.Fatalf("message %s delivered %d times (known: %v)", id, n, want[id])
		}
	}
	if got := collect(m.c1, 10*time.Millisecond, isMessage); len(got) != 0 {
		t.Fatal("C got B's messages")
	}
}

func postHook(t *testing.T, b *testBroker, body string) (int, map[string]any) {
	t.Helper()
	resp, err := http.Post(b.httpURL("/hook/set-status"), "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, out
}

// 02 §12 scenario 7: working holds next, now passes, idle releases; dnd is
// sticky against hooks.
func TestPriorityGate(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	if code, out := postHook(t, b, `{"cwd":"/b1","status":"working"}`); code != 200 || out["presence_id"] != m.b1.HelloAck.PresenceID {
		t.Fatalf("hook: %d %v", code, out)
	}
	held := dm(t, m.a1, m.sa1, m.sb1, "next", "held")
	if !held.Queued {
		t.Fatal("not queued")
	}
	urgent := dm(t, m.a1, m.sa1, m.sb1, "now", "urgent")
	got := append([]client.Frame{waitFrame(t, m.b1, 10*time.Second, isMessage)}, collect(m.b1, 200*time.Millisecond, isMessage)...)
	if len(got) != 1 || decodePush(t, got[0]).MessageID != urgent.MessageID {
		t.Fatalf("working peer got %d pushes", len(got))
	}
	postHook(t, b, `{"cwd":"/b1","status":"idle"}`)
	if p := decodePush(t, waitFrame(t, m.b1, 10*time.Second, isMessage)); p.MessageID != held.MessageID {
		t.Fatalf("released %s, want %s", p.MessageID, held.MessageID)
	}
	// dnd (manual) is not cleared by a hook.
	_ = m.b1.WriteJSON(map[string]any{"type": "set_status", "status": "dnd"})
	_, _ = m.b1.ListPeers(ctxT(t))
	postHook(t, b, `{"cwd":"/b1","status":"idle"}`)
	dm(t, m.a1, m.sa1, m.sb1, "next", "still held")
	if got := collect(m.b1, 200*time.Millisecond, isMessage); len(got) != 0 {
		t.Fatal("dnd peer got a next message")
	}
	// S3: a manual relax drains.
	_ = m.b1.WriteJSON(map[string]any{"type": "set_status", "status": "idle"})
	waitFrame(t, m.b1, 10*time.Second, isMessage)
}

// 02 §12 scenario 8: broadcast reaches every other member's visible
// connection once, never the sender's member, ignoring status.
func TestBroadcast(t *testing.T) {
	t.Parallel()
	for _, target := range []string{"*", "@all"} {
		t.Run(target, func(t *testing.T) {
			b := startTestBroker(t)
			m := b.msgFixture()
			if _, err := m.b2.Request(ctxT(t), map[string]any{"type": "set_visible", "visible": false}); err != nil {
				t.Fatal(err)
			}
			postHook(t, b, `{"cwd":"/c1","status":"working"}`)
			a2 := b.connect(m.a, client.Options{SessionID: "a2"})
			ack, err := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: target, Priority: "low", Nonce: "bm9uY2U=", Ciphertext: "Y2lwaGVy"})
			if err != nil || !ack.Queued {
				t.Fatal(ack, err)
			}
			for _, c := range []*client.Client{m.b1, m.bd, m.c1} {
				f := waitFrame(t, c, 10*time.Second, isMessage)
				p := decodePush(t, f)
				if p.MessageID != ack.MessageID || p.SenderMemberPubkey != m.a.Pubkey() || p.SenderName != "alice" || p.SenderPubkey != m.sa1.Pubkey() || p.Topic != "" {
					t.Fatalf("multicast push %s", f.Raw)
				}
			}
			for _, c := range []*client.Client{m.b2, m.a1, a2} {
				if got := collect(c, 100*time.Millisecond, isMessage); len(got) != 0 {
					t.Fatalf("excluded connection got %s", got[0].Raw)
				}
			}
			if b.row(ack.MessageID).DeliveredAt == nil {
				t.Fatal("broadcast row not delivered")
			}
			late := b.connect(m.c, client.Options{SessionID: "c-late"})
			if got := collect(late, 100*time.Millisecond, isMessage); len(got) != 0 {
				t.Fatal("late joiner got the broadcast")
			}
		})
	}
}

// 02 §12 scenario 9: groups match exactly.
func TestGroupExactMatch(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	_ = m.b1.WriteJSON(map[string]any{"type": "join_group", "name": "eng"})
	_ = m.c1.WriteJSON(map[string]any{"type": "join_group", "name": "eng/core"})
	_, _ = m.b1.ListPeers(ctxT(t))
	_, _ = m.c1.ListPeers(ctxT(t))
	ack, _ := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: "@eng", Nonce: "", Ciphertext: "x"})
	if p := decodePush(t, waitFrame(t, m.b1, 10*time.Second, isMessage)); p.MessageID != ack.MessageID || p.Priority != "next" {
		t.Fatalf("group push %+v", p)
	}
	for _, c := range []*client.Client{m.c1, m.b2, m.bd} {
		if got := collect(c, 100*time.Millisecond, isMessage); len(got) != 0 {
			t.Fatal("non-member got a group message")
		}
	}
	_ = m.b1.WriteJSON(map[string]any{"type": "leave_group", "name": "eng"})
	_, _ = m.b1.ListPeers(ctxT(t))
	ack2, _ := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: "@eng", Nonce: "", Ciphertext: "x"})
	if !ack2.Queued {
		t.Fatal("group send to nobody not queued")
	}
	if got := collect(m.b1, 100*time.Millisecond, isMessage); len(got) != 0 {
		t.Fatal("left group still delivered")
	}
}

// 02 §12 scenarios 10, 19 and bad input: rejections store nothing and keep
// the socket open.
func TestSendRejections(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	other := b.fixture() // a mesh the sender is not in
	otherSess := client.NewSession()
	b.connect(other.a, client.Options{Session: &otherSess})
	noPeer := "no connected peer for target (not online, or targetSpec is your own key without another session)"
	for _, tt := range []struct {
		name  string
		frame map[string]any
		err   string
	}{
		{"unknown key", map[string]any{"targetSpec": strings.Repeat("f", 64), "nonce": "", "ciphertext": ""}, noPeer},
		{"own session key", map[string]any{"targetSpec": m.sa1.Pubkey(), "nonce": "", "ciphertext": ""}, noPeer},
		{"unknown name", map[string]any{"targetSpec": "nobody", "nonce": "", "ciphertext": ""}, noPeer},
		{"key in another mesh", map[string]any{"targetSpec": otherSess.Pubkey(), "nonce": "", "ciphertext": ""}, noPeer},
		{"missing target", map[string]any{"nonce": "", "ciphertext": ""}, "invalid_argument: targetSpec must be a non-empty string"},
		{"target not a string", map[string]any{"targetSpec": 5, "nonce": "", "ciphertext": ""}, "invalid_argument: targetSpec must be a non-empty string"},
		{"bad priority", map[string]any{"targetSpec": "*", "priority": "urgent", "nonce": "", "ciphertext": ""}, "invalid_argument: priority must be one of now, next, low"},
		{"missing ciphertext", map[string]any{"targetSpec": "*", "nonce": ""}, "invalid_argument: ciphertext must be a string"},
		{"nonce not a string", map[string]any{"targetSpec": "*", "nonce": 1, "ciphertext": ""}, "invalid_argument: nonce must be a string"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.frame["type"], tt.frame["id"] = "send", "m-"+tt.name
			if err := m.a1.WriteJSON(tt.frame); err != nil {
				t.Fatal(err)
			}
			f := waitFrame(t, m.a1, 10*time.Second, func(f client.Frame) bool { return f.Type == "ack" })
			var ack protocol.Ack
			_ = f.Decode(&ack)
			if ack.ID != "m-"+tt.name || ack.Queued || ack.MessageID != "" || ack.Error != tt.err {
				t.Fatalf("ack %s", f.Raw)
			}
		})
	}
	if n := b.countRows(m.meshID); n != 0 {
		t.Fatalf("%d rows stored by rejected sends", n)
	}
	// display names resolve [EXT]
	ack, err := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: "Bob-1", Priority: "now", Nonce: "", Ciphertext: "x"})
	if err != nil || !ack.Queued || b.row(ack.MessageID).TargetSpec != m.sb1.Pubkey() {
		t.Fatalf("display name: %+v %v", ack, err)
	}
}

// 02 §12 scenario 11: the per-member token bucket.
func TestSendRateLimit(t *testing.T) {
	t.Parallel()
	// 1/min: a token every 60 s of the broker's clock, so the real time a
	// busy machine takes for the eleven sends and to connect the sibling
	// below refills nothing (at 6/min, 10 s, a hello alone took 2 s).
	b := startTestBroker(t, func(c *config.Config) { c.SendRatePerMin, c.SendRateBurst = 1, 10 })
	m := b.msgFixture()
	var mu sync.Mutex
	var ok, limited int
	var wg sync.WaitGroup
	for i := range 11 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ack, err := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: m.sb1.Pubkey(), Priority: "now", Nonce: "", Ciphertext: fmt.Sprint(i)})
			if err != nil && ack.Error == "" { // a refusal is a *client.SendError with the ack
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if ack.Queued {
				ok++
			} else if ack.Error == "rate_limit: max 60 msg/min (burst 10) — slow down" { // the reference's fixed text
				limited++
			}
		}()
	}
	wg.Wait()
	if ok != 10 || limited != 1 || b.countRows(m.meshID) != 10 {
		t.Fatalf("ok %d limited %d rows %d", ok, limited, b.countRows(m.meshID))
	}
	// A sibling connection of A shares the bucket.
	a2 := b.connect(m.a, client.Options{SessionID: "a2"})
	if ack, _ := a2.Send(ctxT(t), client.SendRequest{TargetSpec: "*", Nonce: "", Ciphertext: ""}); ack.Queued {
		t.Fatal("sibling has its own bucket")
	}
	b.advance(time.Minute) // one token refills every 60 s at 1/min
	if ack, _ := a2.Send(ctxT(t), client.SendRequest{TargetSpec: "*", Nonce: "", Ciphertext: ""}); !ack.Queued {
		t.Fatalf("no refill: %+v", ack)
	}
}

// 02 §12 scenario 12: peer grants.
func TestGrants(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	b.exec("UPDATE {member} SET peer_grants = ? WHERE id = ?", fmt.Sprintf(`{%q:["read"]}`, m.a.Pubkey()), m.b.MemberID)
	ack, _ := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: m.sb1.Pubkey(), Nonce: "", Ciphertext: ""})
	if ack.Error != "blocked by recipient grants (sender lacks dm capability)" {
		t.Fatalf("ack %+v", ack)
	}
	bc, _ := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: "*", Nonce: "", Ciphertext: ""})
	if !bc.Queued {
		t.Fatal("broadcast refused")
	}
	waitFrame(t, m.c1, 10*time.Second, isMessage)
	for _, c := range []*client.Client{m.b1, m.b2, m.bd} {
		if len(collect(c, 100*time.Millisecond, isMessage)) != 0 {
			t.Fatal("denied recipient got the broadcast")
		}
	}
}

// 02 §12 scenario 15 [GO]: a retried send with the same client_message_id
// is stored once and acked with the same messageId.
func TestIdempotentRetry(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	req := client.SendRequest{ID: "K", ClientMessageID: "K", RequestFingerprint: strings.Repeat("f", 64), TargetSpec: m.b.Pubkey(), Priority: "now", Nonce: "", Ciphertext: "x"}
	first, _ := m.a1.Send(ctxT(t), req)
	second, _ := m.a1.Send(ctxT(t), req)
	if !first.Queued || first.MessageID != second.MessageID || !second.Queued {
		t.Fatalf("%+v %+v", first, second)
	}
	if n := b.countRows(m.meshID); n != 1 {
		t.Fatalf("%d rows", n)
	}
	req.RequestFingerprint = strings.Repeat("e", 64)
	third, _ := m.a1.Send(ctxT(t), req)
	if third.Queued || !strings.Contains(third.Error, "invalid") {
		t.Fatalf("reused id: %+v", third)
	}
	var pushes int
	gather := func(d time.Duration) {
		for _, c := range []*client.Client{m.b1, m.b2, m.bd} {
			for _, f := range collect(c, d, isMessage) {
				if p := decodePush(t, f); p.ClientMessageID != "K" {
					t.Fatalf("push lacks client_message_id: %s", f.Raw)
				}
				pushes++
			}
		}
	}
	// The push must arrive, however long that takes; then a while more
	// for a second one.
	for deadline := time.Now().Add(10 * time.Second); pushes == 0 && time.Now().Before(deadline); {
		gather(20 * time.Millisecond)
	}
	gather(200 * time.Millisecond)
	if pushes != 1 {
		t.Fatalf("%d pushes", pushes)
	}
}

// 02 §12 scenario 16: message_status.
func TestMessageStatus(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	// b1 acks, so its row stays held until client_ack: a non-acking b1's
	// row is closed by the pong that confirms the push (M3), which a busy
	// machine answered before the message_status below.
	_ = m.b1.ClientAck("", "warm-up")
	_, _ = m.b1.ListPeers(ctxT(t))
	ack := dm(t, m.a1, m.sa1, m.sb1, "now", "x")
	waitFrame(t, m.b1, 10*time.Second, isMessage)
	f, err := m.a1.Request(ctxT(t), map[string]any{"type": "message_status", "messageId": ack.MessageID[:8]})
	if err != nil {
		t.Fatal(err)
	}
	var res protocol.MessageStatusResult
	_ = f.Decode(&res)
	if res.MessageID != ack.MessageID[:8] || res.TargetSpec != m.sb1.Pubkey() || res.Delivered || res.DeliveredAt != nil ||
		len(res.Recipients) != 1 || res.Recipients[0].Status != "held" || res.Recipients[0].Name != "bob-1" {
		t.Fatalf("%s", f.Raw)
	}
	_ = m.b1.ClientAck(ack.MessageID, "")
	waitFor(t, 10*time.Second, "delivered", func() bool { return b.row(ack.MessageID).DeliveredAt != nil })
	f, _ = m.a1.Request(ctxT(t), map[string]any{"type": "message_status", "messageId": ack.MessageID})
	_ = f.Decode(&res)
	if !res.Delivered || res.DeliveredAt == nil || res.Recipients[0].Status != "delivered" {
		t.Fatalf("%s", f.Raw)
	}
	_, err = m.a1.Request(ctxT(t), map[string]any{"type": "message_status", "messageId": "abc"})
	if e, ok := err.(*client.ErrorReply); !ok || e.Code != "invalid_argument" || e.Message != "messageId must be 8-32 base62 chars (got 3)" {
		t.Fatalf("%v", err)
	}
	_, err = m.a1.Request(ctxT(t), map[string]any{"type": "message_status", "messageId": strings.Repeat("Z", 32)})
	if e, ok := err.(*client.ErrorReply); !ok || e.Code != "not_found" {
		t.Fatalf("%v", err)
	}
}

// 02 §12 scenario 17 [GO]: topics with live multicast.
func TestTopics(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	f, err := m.a1.Request(ctxT(t), map[string]any{"type": "topic_create", "name": "ops"})
	if err != nil {
		t.Fatal(err)
	}
	var tc protocol.TopicCreated
	_ = f.Decode(&tc)
	if !tc.Created || tc.Topic.Name != "ops" || tc.Topic.Visibility != "public" || len(tc.Topic.ID) != 32 {
		t.Fatalf("%s", f.Raw)
	}
	f, _ = m.a1.Request(ctxT(t), map[string]any{"type": "topic_create", "name": "ops"})
	var again protocol.TopicCreated
	_ = f.Decode(&again)
	if again.Created || again.Topic.ID != tc.Topic.ID {
		t.Fatalf("%s", f.Raw)
	}
	_ = m.b1.WriteJSON(map[string]any{"type": "topic_join", "topic": "ops"})
	f, _ = m.b1.Request(ctxT(t), map[string]any{"type": "topic_list"})
	if !strings.Contains(string(f.Raw), `"name":"ops"`) || !strings.Contains(string(f.Raw), `"memberCount":2`) {
		t.Fatalf("%s", f.Raw)
	}
	_ = m.b1.WriteJSON(map[string]any{"type": "topic_join", "topic": "nope", "_reqId": "tj1"})
	ef := waitFrame(t, m.b1, 10*time.Second, func(f client.Frame) bool { return f.Type == "error" })
	if !strings.Contains(string(ef.Raw), `"code":"topic_not_found"`) || !strings.Contains(string(ef.Raw), `"id":"tj1"`) {
		t.Fatalf("%s", ef.Raw)
	}
	ack, _ := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: "#" + tc.Topic.ID, Nonce: "", Ciphertext: "post"})
	if !ack.Queued {
		t.Fatalf("%+v", ack)
	}
	for _, c := range []*client.Client{m.b1, m.b2, m.bd} {
		p := decodePush(t, waitFrame(t, c, 10*time.Second, isMessage))
		if p.Topic != "ops" || p.MessageID == ack.MessageID {
			t.Fatalf("topic push %+v", p)
		}
	}
	if len(collect(m.c1, 100*time.Millisecond, isMessage)) != 0 {
		t.Fatal("non-member got the topic post")
	}
	var n int64
	b.query(&n, "SELECT count(*) FROM {topic_message} WHERE topic_id = ?", tc.Topic.ID)
	if n != 1 {
		t.Fatalf("%d topic_message rows", n)
	}
	bad, _ := m.a1.Send(ctxT(t), client.SendRequest{TargetSpec: "#" + strings.Repeat("x", 32), Nonce: "", Ciphertext: ""})
	if bad.Queued || bad.Error != "not_found: topic "+strings.Repeat("x", 32) {
		t.Fatalf("%+v", bad)
	}
	_ = m.b1.WriteJSON(map[string]any{"type": "topic_leave", "topic": tc.Topic.ID})
	waitFor(t, 10*time.Second, "membership removed", func() bool {
		var k int64
		b.query(&k, "SELECT count(*) FROM {topic_member} WHERE topic_id = ? AND member_id = ?", tc.Topic.ID, m.b.MemberID)
		return k == 0
	})
}

// An acked message survives a broker restart between ack and drain (M2).
func TestAckedMessageSurvivesRestart(t *testing.T) {
	t.Parallel()
	// b1's lease must outlast the send (a DM to a session whose lease ran
	// out is refused) and, restored, the reconnect after the restart.
	b := startTestBroker(t, withLease(30*time.Second))
	m := b.msgFixture()
	m.b1.Kill() // b1 in grace: the DM is stored, not claimed
	b.waitOffline(m.b1.HelloAck.PresenceID)
	ack := dm(t, m.a1, m.sa1, m.sb1, "next", "durable")
	b.stop()
	b2 := reopen(t, b)
	back := b2.connect(m.b, client.Options{Session: &m.sb1, SessionID: "b1"})
	p := decodePush(t, waitFrame(t, back, 10*time.Second, isMessage))
	if p.MessageID != ack.MessageID {
		t.Fatalf("got %s want %s", p.MessageID, ack.MessageID)
	}
	if body, err := client.Open(p.Nonce, p.Ciphertext, pub(m.sa1.Key), m.sb1.Key); err != nil || string(body) != "durable" {
		t.Fatalf("%q %v", body, err)
	}
}

// 02 §12 scenario 20 [GO]: no duplicates under concurrent mixed load with
// acking recipients.
func TestNoDuplicatesUnderLoad(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	type peer struct {
		c    *client.Client
		sess client.Session
		id   client.Identity
	}
	var peers []peer
	ids := []client.Identity{f.a, f.b, f.c}
	for i := range 20 {
		s := client.NewSession()
		id := ids[i%3]
		peers = append(peers, peer{c: b.connect(id, client.Options{Session: &s, SessionID: fmt.Sprint("p", i), Groups: []protocol.Group{{Name: "g"}}}), sess: s, id: id})
	}
	var mu sync.Mutex
	seen := make([]map[string]int, len(peers))
	stop := make(chan struct{})
	var readers sync.WaitGroup
	for i, p := range peers {
		seen[i] = map[string]int{}
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				select {
				case fr := <-p.c.Events():
					if isMessage(fr) {
						pe := decodePush(t, fr)
						mu.Lock()
						seen[i][pe.MessageID]++
						mu.Unlock()
						_ = p.c.ClientAck(pe.MessageID, "")
					}
				case <-stop:
					return
				}
			}
		}()
	}
	var wg sync.WaitGroup
	for i, p := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 50 {
				target := "*"
				switch j % 3 {
				case 0:
					target = peers[(i+1+j%(len(peers)-1))%len(peers)].sess.Pubkey()
				case 1:
					target = "@g"
				}
				if ack, err := p.c.Send(ctxT(t), client.SendRequest{TargetSpec: target, Priority: "now", Nonce: "", Ciphertext: fmt.Sprint(i, "-", j)}); err != nil || !ack.Queued {
					t.Errorf("send: %+v %v", ack, err)
				}
			}
		}()
	}
	wg.Wait()
	waitFor(t, 60*time.Second, "all DMs delivered", func() bool { // a thousand sends, a third of them to 20 sockets
		var n int64
		b.query(&n, "SELECT count(*) FROM {message_queue} WHERE mesh_id = ? AND delivered_at IS NULL", f.meshID)
		return n == 0
	})
	close(stop)
	readers.Wait()
	for i := range peers {
		for id, n := range seen[i] {
			if n != 1 {
				t.Fatalf("peer %d saw %s %d times", i, id, n)
			}
		}
	}
}

// A client that acks and had a push in flight when the broker stopped gets
// it from the next broker at once, not after the claim lease.
func TestInflightReleasedAtShutdown(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	m := b.msgFixture()
	_ = m.b1.ClientAck("", "warm-up")
	_, _ = m.b1.ListPeers(ctxT(t)) // the ack above is processed
	ack := dm(t, m.a1, m.sa1, m.sb1, "now", "in flight")
	waitFrame(t, m.b1, 10*time.Second, isMessage) // pushed, never acked
	b.stop()
	b2 := reopen(t, b)
	back := b2.connect(m.b, client.Options{Session: &m.sb1, SessionID: "b1"})
	if p := decodePush(t, waitFrame(t, back, 10*time.Second, isMessage)); p.MessageID != ack.MessageID {
		t.Fatalf("got %s, want %s", p.MessageID, ack.MessageID)
	}
}
