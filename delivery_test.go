package main

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/internal/clienttest"
)

// Regression tests of issue 13 items 2-4: a row is marked delivered only
// on proof, the proof is made durable promptly, and a graceful shutdown
// answers every accepted send and confirms every written push.

// drainDead closes a client's connection and returns every message push it
// had read off the wire, also those still in its event buffer: a reader
// blocked on a full buffer would otherwise never finish.
func drainDead(t *testing.T, c *client.Client) []string {
	t.Helper()
	closed := make(chan struct{})
	go func() { c.Kill(); close(closed) }()
	var ids []string
	for {
		select {
		case f := <-c.Events():
			if isMessage(f) {
				ids = append(ids, decodePush(t, f).MessageID)
			}
		case <-closed:
			for {
				select {
				case f := <-c.Events():
					if isMessage(f) {
						ids = append(ids, decodePush(t, f).MessageID)
					}
				default:
					return ids
				}
			}
		}
	}
}

// Issue 13 item 2 (M2): a non-acking recipient that stays connected but
// stops reading, then drops and reconnects, gets every acked message. The
// claims run out while it is frozen; its pushes were never confirmed by a
// pong, so they must be pushed again, never marked delivered.
func TestFrozenReaderGetsEveryAckedMessage(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) {
		c.ClaimLease = 300 * time.Millisecond
		c.ClaimReapInterval = 20 * time.Millisecond
	})
	f := b.fixture()
	sa, sb := client.NewSession(), client.NewSession()
	a := b.connect(f.a, client.Options{Session: &sa, SessionID: "a"})
	// An event buffer of one: the client's reader blocks on the second
	// frame and stops reading the socket, pongs included.
	frozen := b.connect(f.b, client.Options{Session: &sb, SessionID: "b", EventBuffer: 1})
	acked := map[string]bool{}
	for i := range 20 {
		n, c := sealTo(t, sa.Key, pub(sb.Key), fmt.Sprint("m", i))
		ack, err := a.Send(ctxT(t), client.SendRequest{TargetSpec: sb.Pubkey(), Priority: "now", Nonce: n, Ciphertext: c})
		if err != nil || !ack.Queued {
			t.Fatalf("send %d: %+v %v", i, ack, err)
		}
		acked[ack.MessageID] = true
	}
	// Wait until every row went through a claim expiry: it is either
	// proven delivered or claimed again after its first claim ran out.
	type claim struct {
		ID             string
		DeliveredAt    *time.Time
		ClaimedAt      *time.Time
		ClaimExpiresAt *time.Time
	}
	first := map[string]time.Time{}
	waitFor(t, 20*time.Second, "every claim expired and resolved", func() bool {
		var rows []claim
		b.query(&rows, "SELECT id, delivered_at, claimed_at, claim_expires_at FROM {message_queue} WHERE mesh_id = ?", f.meshID)
		done := 0
		for _, r := range rows {
			switch {
			case r.DeliveredAt != nil:
				done++
			case r.ClaimedAt == nil:
			case first[r.ID].IsZero():
				first[r.ID] = *r.ClaimExpiresAt
			case r.ClaimedAt.After(first[r.ID]):
				done++
			}
		}
		return done == len(acked)
	})
	got := map[string]bool{}
	for _, id := range drainDead(t, frozen) {
		got[id] = true
	}
	back := b.connect(f.b, client.Options{Session: &sb, SessionID: "b"})
	var mu sync.Mutex
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case fr := <-back.Events():
				if isMessage(fr) {
					mu.Lock()
					got[decodePush(t, fr).MessageID] = true
					mu.Unlock()
				}
			case <-stop:
				return
			}
		}
	}()
	defer close(stop)
	waitFor(t, 20*time.Second, "every acked message delivered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for id := range acked {
			if !got[id] {
				return false
			}
		}
		return true
	})
}

// Issue 13 item 3 (M3): a non-acking client's push is marked delivered as
// soon as a pong confirms it, long before its claim runs out and while its
// socket stays open, so a crash cannot replay it.
func TestPongConfirmsPushDurably(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t) // ClaimLease 30 s
	m := b.msgFixture()
	ack := dm(t, m.a1, m.sa1, m.sb1, "now", "confirm me")
	if p := decodePush(t, waitFrame(t, m.b1, 10*time.Second, isMessage)); p.MessageID != ack.MessageID {
		t.Fatalf("got %s want %s", p.MessageID, ack.MessageID)
	}
	waitFor(t, 10*time.Second, "delivered_at set by the pong", func() bool { return b.row(ack.MessageID).DeliveredAt != nil })
	if r := b.row(ack.MessageID); r.ClaimExpiresAt == nil || !r.ClaimExpiresAt.After(*r.DeliveredAt) {
		t.Fatalf("marked at or after claim expiry, not by the pong: %+v", r)
	}
}

// A push written to a client that never answers pings is never marked
// delivered by the pong path, and its next socket gets it.
func TestUnconfirmedPushReleasedOnClose(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	sa, sb := client.NewSession(), client.NewSession()
	a := b.connect(f.a, client.Options{Session: &sa, SessionID: "a"})
	deaf := b.connect(f.b, clienttest.NoPong(client.Options{Session: &sb, SessionID: "b"}))
	n, c := sealTo(t, sa.Key, pub(sb.Key), "unconfirmed")
	ack, err := a.Send(ctxT(t), client.SendRequest{TargetSpec: sb.Pubkey(), Priority: "now", Nonce: n, Ciphertext: c})
	if err != nil || !ack.Queued {
		t.Fatalf("%+v %v", ack, err)
	}
	waitFrame(t, deaf, 10*time.Second, isMessage)
	deaf.Kill()
	back := b.connect(f.b, client.Options{Session: &sb, SessionID: "b"})
	if p := decodePush(t, waitFrame(t, back, 10*time.Second, isMessage)); p.MessageID != ack.MessageID {
		t.Fatalf("got %s want %s", p.MessageID, ack.MessageID)
	}
}

// Issue 13 item 4: a graceful shutdown under load acks every send it
// committed and confirms every push it wrote to a client that answers
// pings, so after a restart nothing is lost, nothing is pushed twice and
// no committed send went unacked.
func TestShutdownUnderLoadAcksAndConfirms(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.ShutdownConfirm = 5 * time.Second })
	f := b.fixture()
	sa, sb := client.NewSession(), client.NewSession()
	a := b.connect(f.a, client.Options{Session: &sa, SessionID: "a"})
	rcpt := b.connect(f.b, client.Options{Session: &sb, SessionID: "b"})
	var mu sync.Mutex
	acked := map[string]bool{}
	seen := map[string]int{}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			select {
			case fr := <-rcpt.Events():
				if isMessage(fr) {
					mu.Lock()
					seen[decodePush(t, fr).MessageID]++
					mu.Unlock()
				}
			case <-rcpt.Done():
				return
			}
		}
	}()
	n, c := sealTo(t, sa.Key, pub(sb.Key), "load")
	var senders sync.WaitGroup
	for range 8 { // 8 sends in flight on one socket: pipelined commits
		senders.Add(1)
		go func() {
			defer senders.Done()
			for {
				ack, err := a.Send(ctxT(t), client.SendRequest{TargetSpec: sb.Pubkey(), Priority: "now", Nonce: n, Ciphertext: c})
				if err != nil {
					return // the socket closed: this send was not acked
				}
				if !ack.Queued {
					t.Errorf("rejected: %+v", ack)
					return
				}
				mu.Lock()
				acked[ack.MessageID] = true
				mu.Unlock()
			}
		}()
	}
	waitFor(t, 60*time.Second, "traffic flowing", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) >= 300 })
	b.stop()
	senders.Wait()
	<-readerDone
	var committed []string
	b2 := reopen(t, b)
	b2.query(&committed, "SELECT id FROM {message_queue} WHERE mesh_id = ?", f.meshID)
	mu.Lock()
	for _, id := range committed {
		if !acked[id] {
			t.Errorf("row %s committed but never acked", id)
		}
	}
	if len(committed) != len(acked) {
		t.Errorf("%d rows committed, %d acked", len(committed), len(acked))
	}
	firstRun := len(seen)
	mu.Unlock()
	back := b2.connect(f.b, client.Options{Session: &sb, SessionID: "b"})
	second := map[string]int{}
	waitFor(t, 20*time.Second, "every acked message delivered", func() bool {
		for {
			select {
			case fr := <-back.Events():
				if isMessage(fr) {
					second[decodePush(t, fr).MessageID]++
				}
				continue
			default:
			}
			break
		}
		for id := range acked {
			if seen[id] == 0 && second[id] == 0 {
				return false
			}
		}
		var open int64
		b2.query(&open, "SELECT count(*) FROM {message_queue} WHERE mesh_id = ? AND delivered_at IS NULL", f.meshID)
		return open == 0
	})
	dups := 0
	for id, n := range second {
		dups += n - 1
		if seen[id] > 0 {
			dups++
		}
	}
	for _, n := range seen {
		dups += n - 1
	}
	if dups != 0 {
		t.Fatalf("%d duplicates (first run %d messages, after restart %d)", dups, firstRun, len(second))
	}
	t.Logf("acked %d, delivered before shutdown %d, after restart %d", len(acked), firstRun, len(second))
}
