package main

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// Restored leases in process (issue 16): what a restart keeps, what it
// refuses, and a database the reference broker wrote. The child-process
// runs with SIGTERM and kill -9 are in restart_test.go.

// leaseState reads a presence's meshbroker_lease state ("" without a row).
func (b *testBroker) leaseState(presenceID string) string {
	b.t.Helper()
	var states []string
	b.query(&states, "SELECT lease_state FROM "+b.db.Table("meshbroker_lease")+" WHERE presence_id = ?", presenceID)
	if len(states) == 0 {
		return ""
	}
	return states[0]
}

// withStorage runs fn on a separate handle to a stopped broker's storage.
func withStorage(t *testing.T, b *testBroker, fn func(db *models.DB)) {
	t.Helper()
	db, err := models.Open(context.Background(), b.cfg.DatabaseURL, b.cfg.DataDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	fn(db)
}

// After a restart, restored peers are listed as before: status, summary,
// groups, profile and visibility (a hidden peer stays hidden from other
// members), and the presentation set after the hello came from the batched
// lease rewrite.
func TestRestoredLeasesListedAsBefore(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(20*time.Second))
	f := b.fixture()
	sess := client.NewSession()
	s := b.connect(f.a, client.Options{Session: &sess, SessionID: "claude", Groups: []protocol.Group{{Name: "dev", Role: "lead"}}})
	hidden := b.connect(f.b, client.Options{SessionID: "hidden-daemon"})
	if _, err := s.Request(ctxT(t), map[string]any{"type": "set_profile", "title": "builder", "bio": "restarts"}); err != nil {
		t.Fatal(err)
	}
	if _, err := hidden.Request(ctxT(t), map[string]any{"type": "set_visible", "visible": false}); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteJSON(map[string]any{"type": "set_summary", "summary": "porting leases"}); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteJSON(map[string]any{"type": "set_status", "status": "working"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "summary and status stored", func() bool {
		var rows []struct {
			Summary *string
			Status  string
		}
		b.query(&rows, "SELECT summary, status FROM {presence} WHERE id = ?", s.HelloAck.PresenceID)
		return len(rows) == 1 && rows[0].Summary != nil && *rows[0].Summary == "porting leases" && rows[0].Status == "working"
	})
	waitFor(t, 10*time.Second, "profile and visibility flushed", func() bool {
		var n int64
		b.query(&n, "SELECT count(*) FROM "+b.db.Table("meshbroker_lease")+" WHERE (presence_id = ? AND CAST(profile AS TEXT) LIKE '%builder%') OR (presence_id = ? AND visible = ?)",
			s.HelloAck.PresenceID, hidden.HelloAck.PresenceID, false)
		return n == 2
	})
	b.stop()

	b2 := reopen(t, b)
	obs := b2.connect(f.c, client.Options{})
	peers, err := obs.ListPeers(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	var got *protocol.PeerInfo
	for i := range peers {
		if peers[i].Pubkey == sess.Pubkey() {
			got = &peers[i]
		}
		if peers[i].MemberPubkey == f.b.Pubkey() {
			t.Fatalf("hidden peer listed after restart: %+v", peers[i])
		}
	}
	if got == nil {
		t.Fatalf("restored session not listed: %+v", peers)
	}
	if got.Status != "working" || got.Summary == nil || *got.Summary != "porting leases" || len(got.Groups) != 1 || got.Groups[0].Name != "dev" ||
		got.Visible == nil || !*got.Visible || !strings.Contains(string(got.Profile), "builder") || got.Cwd != "/work/alice" {
		raw, _ := json.Marshal(got)
		t.Fatalf("restored peer listed as %s", raw)
	}
	// And it reattaches silently with its presence id.
	again := b2.connect(f.a, client.Options{Session: &sess, SessionID: "claude"})
	if again.HelloAck.PresenceID != s.HelloAck.PresenceID {
		t.Fatalf("reattach after restart: %s", again.AckRaw)
	}
	if evs := collect(obs, 100*time.Millisecond, isPresenceEvent); len(evs) != 0 {
		t.Fatalf("reattach after restart visible: %s", evs[0].Raw)
	}
}

// A member revoked while no broker ran: its restored lease is refused at
// reattach (4002) and ends at once, announced with exactly one peer_left.
func TestRestoredLeaseOfRevokedMember(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(20*time.Second))
	f := b.fixture()
	sess := client.NewSession()
	s := b.connect(f.b, client.Options{Session: &sess, SessionID: "bob-claude"})
	observer := b.connect(f.c, client.Options{SessionID: "observer"})
	b.stop()
	withStorage(t, b, func(db *models.DB) {
		if err := db.Exec("UPDATE "+db.Table("member")+" SET revoked_at = ? WHERE id = ?", time.Now().UTC(), f.b.MemberID).Error; err != nil {
			t.Fatal(err)
		}
	})

	b2 := reopen(t, b)
	if b2.presence.Get(s.HelloAck.PresenceID) == nil {
		t.Fatal("lease of the revoked member not restored")
	}
	obs := b2.connect(f.c, client.Options{SessionID: "observer"})
	if obs.HelloAck.PresenceID != observer.HelloAck.PresenceID {
		t.Fatal("observer not reattached")
	}
	_, err := b2.tryConnect(f.b, client.Options{Session: &sess, SessionID: "bob-claude"})
	var he *client.HandshakeError
	if !errors.As(err, &he) || he.Code != "revoked" || he.Close == nil || he.Close.Code != 4002 {
		t.Fatalf("reattach of a revoked member: %v", err)
	}
	left := waitFrame(t, obs, 10*time.Second, isEvent("peer_left"))
	if !strings.Contains(string(left.Raw), sess.Pubkey()) {
		t.Fatalf("peer_left for someone else: %s", left.Raw)
	}
	if b2.presence.Get(s.HelloAck.PresenceID) != nil || b2.leaseState(s.HelloAck.PresenceID) != "" {
		t.Fatal("revoked lease still held")
	}
	// Another attempt finds no lease: no second peer_left.
	if _, err := b2.tryConnect(f.b, client.Options{Session: &sess, SessionID: "bob-claude"}); !errors.As(err, &he) || he.Code != "revoked" {
		t.Fatalf("second attempt: %v", err)
	}
	if evs := collect(obs, 200*time.Millisecond, isPresenceEvent); len(evs) != 0 {
		t.Fatalf("more presence events: %s", evs[0].Raw)
	}
}

// A database the reference broker wrote has live presence rows but no
// meshbroker_lease rows: nothing is restored, and those peers' hellos are
// fresh ones.
func TestReferenceDatabaseRestoresNothing(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	c := b.connect(f.a, client.Options{SessionID: "ref-daemon"})
	b.stop()
	withStorage(t, b, func(db *models.DB) {
		if err := db.Exec("DELETE FROM " + db.Table("meshbroker_lease")).Error; err != nil {
			t.Fatal(err)
		}
	})
	b2 := reopen(t, b)
	if n := b2.presence.MeshCount(f.meshID); n != 0 {
		t.Fatalf("%d leases restored from a reference database", n)
	}
	again := b2.connect(f.a, client.Options{SessionID: "ref-daemon"})
	if again.HelloAck.PresenceID == c.HelloAck.PresenceID {
		t.Fatal("a presence without a lease row was resumed")
	}
}

// A lease row follows its presence: inserted with it, rewritten as it
// enters grace and comes back, deleted when it is evicted.
func TestLeaseRowFollowsPresence(t *testing.T) {
	t.Parallel()
	// The grace row must be seen before the lease runs out: it is flushed
	// every LeaseFlush after the broker sees the socket go.
	b := startTestBroker(t, withLease(10*time.Second))
	f := b.fixture()
	bob := b.connect(f.b, client.Options{})
	sess := client.NewSession()
	s := b.connect(f.a, client.Options{Session: &sess})
	pid := s.HelloAck.PresenceID
	if st := b.leaseState(pid); st != "online" {
		t.Fatalf("lease row after hello: %q", st)
	}
	s.Kill()
	waitFor(t, 10*time.Second, "grace flushed", func() bool { return b.leaseState(pid) == "grace" })
	waitFrame(t, bob, 30*time.Second, isEvent("peer_left"))
	// peer_left goes out first, then the rows are ended.
	waitFor(t, 10*time.Second, "rows ended at eviction", func() bool {
		disc, _ := b.presenceRow(pid)
		return b.leaseState(pid) == "" && disc != nil
	})
}
