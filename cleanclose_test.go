package main

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
)

// A client's own normal close ends a member presence after
// CLEAN_CLOSE_LEASE_MS; a drop keeps the full LEASE_TTL_MS; a session
// presence keeps the full lease either way (the CLI daemon closes a
// session socket normally and reopens the same session key at once).

func withCleanClose(lease, clean time.Duration) func(*config.Config) {
	return func(c *config.Config) { c.LeaseTTL, c.CleanCloseLease = lease, clean }
}

// A one-shot CLI command: a member hello with a session label, closed with
// 1000. One peer_left, well inside the 30 s lease; gone from list_peers;
// the DM sent to the member key meanwhile reaches the member's next socket.
func TestCleanCloseEndsMemberLease(t *testing.T) {
	t.Parallel()
	// The DM below must reach the broker inside the clean-close grace: a
	// send 170 ms after the close found a 100 ms grace over.
	b := startTestBroker(t, withCleanClose(30*time.Second, 3*time.Second))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	label := client.NewSession()
	cli, err := b.tryConnect(f.a, client.Options{SessionPubkey: label.Pubkey(), SessionID: "cli-1", DisplayName: "alice-cli"})
	if err != nil {
		t.Fatal(err)
	}
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	pid := cli.HelloAck.PresenceID
	closedAt := time.Now()
	if err := cli.Close(); err != nil {
		t.Fatal(err)
	}
	n, c := sealTo(t, f.b.Key, pub(f.a.Key), "for alice")
	ack, err := bob.Send(ctxT(t), client.SendRequest{TargetSpec: f.a.Pubkey(), Priority: "now", Nonce: n, Ciphertext: c})
	if err != nil || ack.MessageID == "" {
		t.Fatalf("send: %+v %v", ack, err)
	}
	left := decodePush(t, waitFrame(t, bob, 20*time.Second, isEvent("peer_left")))
	if took := time.Since(closedAt); took > 20*time.Second {
		t.Fatalf("peer_left after %s: the full lease ran", took)
	}
	var data struct{ Name, Pubkey string }
	_ = json.Unmarshal(left.EventData, &data)
	if data.Pubkey != label.Pubkey() || data.Name != "alice-cli" {
		t.Fatalf("peer_left %s", left.EventData)
	}
	if more := collect(bob, 300*time.Millisecond, isEvent("peer_left")); len(more) != 0 {
		t.Fatal("peer_left twice")
	}
	if b.presence.Get(pid) != nil {
		t.Fatal("presence still registered")
	}
	peers, err := bob.ListPeers(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range peers {
		if p.Pubkey == label.Pubkey() {
			t.Fatalf("ghost in list_peers: %+v", p)
		}
	}
	if disc, _ := b.presenceRow(pid); disc == nil {
		t.Fatal("eviction did not set disconnected_at")
	}
	waitFor(t, 10*time.Second, "audit peer_left", func() bool { return b.auditCount(f.meshID, "peer_left") == 1 })
	daemon := b.connect(f.a, client.Options{SessionID: "daemon"})
	if got := decodePush(t, waitFrame(t, daemon, 10*time.Second, isMessage)); got.MessageID != ack.MessageID {
		t.Fatalf("daemon got %s, want %s", got.MessageID, ack.MessageID)
	}
}

// CLEAN_CLOSE_LEASE_MS=0 ends the presence at once; a socket cut without a
// close frame (a drop) still keeps its full silent lease and reattaches.
func TestDroppedSocketKeepsFullLease(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withCleanClose(30*time.Second, 0))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	d := b.connect(f.a, client.Options{SessionID: "daemon-1"})
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	d.Kill()
	b.waitOffline(d.HelloAck.PresenceID)
	peers, err := bob.ListPeers(ctxT(t))
	if err != nil || len(peers) != 2 || !peers[1].InGrace {
		t.Fatalf("dropped socket not in grace: %+v %v", peers, err)
	}
	if got := collect(bob, 300*time.Millisecond, isEvent("peer_left")); len(got) != 0 {
		t.Fatal("a drop announced peer_left")
	}
	again := b.connect(f.a, client.Options{SessionID: "daemon-1"})
	if again.HelloAck.PresenceID != d.HelloAck.PresenceID {
		t.Fatalf("drop did not reattach: %s vs %s", again.HelloAck.PresenceID, d.HelloAck.PresenceID)
	}
	// The same member closing normally with a zero grace leaves at once.
	_ = again.Close()
	waitFrame(t, bob, 10*time.Second, isEvent("peer_left"))
}

// The CLI daemon's session re-register: it closes the session socket
// normally and opens a session_hello with the same session key. That
// reattaches silently even with a zero clean-close grace.
func TestCleanCloseSessionReattachesSilently(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withCleanClose(30*time.Second, 0))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	sess := client.NewSession()
	s, err := b.tryConnect(f.a, client.Options{Session: &sess, SessionID: "claude-1"})
	if err != nil {
		t.Fatal(err)
	}
	waitFrame(t, bob, 10*time.Second, isEvent("peer_joined"))
	_ = s.Close()
	b.waitOffline(s.HelloAck.PresenceID)
	again := b.connect(f.a, client.Options{Session: &sess, SessionID: "claude-1"})
	if again.HelloAck.PresenceID != s.HelloAck.PresenceID {
		t.Fatalf("session reattach got %s, want %s", again.HelloAck.PresenceID, s.HelloAck.PresenceID)
	}
	for _, fr := range collect(bob, 300*time.Millisecond, func(fr client.Frame) bool {
		return isEvent("peer_left")(fr) || isEvent("peer_joined")(fr)
	}) {
		t.Fatalf("flap visible: %s", fr.Raw)
	}
}
