package main

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/internal/brokerproc"
	"github.com/claudemesh/meshbroker/internal/clienttest"
	"github.com/claudemesh/meshbroker/protocol"
)

// Durable leases across a real process restart (issue 16): the broker binary
// runs as a child process, is stopped with SIGTERM or killed with SIGKILL,
// and started again on the same storage. Every peer that comes back inside
// the lease keeps its presence id, nobody sees a presence event, and a DM
// sent before the peer is back is delivered once after its hello_ack.

// startChild starts the binary on st with the lease and returns once it
// listens; port 0 lets the kernel pick, another port takes it over.
func startChild(t *testing.T, name string, st brokerproc.Storage, port int, lease time.Duration) *brokerproc.Broker {
	t.Helper()
	ch := newChild(t, name, st, port, lease)
	ch.Start()
	return ch
}

// newChild prepares one broker process (started with Start or Launch).
func newChild(t *testing.T, name string, st brokerproc.Storage, port int, lease time.Duration) *brokerproc.Broker {
	t.Helper()
	return brokerproc.New(t, brokerproc.Options{Name: name, Storage: st, Port: port,
		Env: []string{"LEASE_TTL_MS=" + strconv.FormatInt(lease.Milliseconds(), 10), "SEND_RATE_LIMIT_PER_MIN=0"}})
}

// isPresenceEvent matches the system pushes a flap would show.
func isPresenceEvent(f client.Frame) bool {
	for _, e := range []string{"peer_joined", "peer_returned", "peer_left"} {
		if isEvent(e)(f) {
			return true
		}
	}
	return false
}

// restartPeer is one peer of the restart scenario.
type restartPeer struct {
	name  string
	id    client.Identity
	opts  client.Options
	bare  bool // reconnect with the resume token alone (no signature, no attestation)
	c     *client.Client
	pid   string
	token string
}

func TestRestartKeepsLeasesSIGTERM(t *testing.T) { testRestartKeepsLeases(t, syscall.SIGTERM) }
func TestRestartKeepsLeasesKill(t *testing.T)    { testRestartKeepsLeases(t, syscall.SIGKILL) }

func testRestartKeepsLeases(t *testing.T, sig syscall.Signal) {
	t.Parallel() // its own storage, port and process
	const lease = 6 * time.Second
	st := brokerproc.NewStorage(t)
	db := st.Bootstrap(t)
	f := newFixture(t, db)
	first := startChild(t, "first broker", st, 0, lease)

	observer := first.Dial(f.c, client.Options{SessionID: "observer"})
	var peers []*restartPeer
	for i := range 4 {
		s := client.NewSession()
		peers = append(peers, &restartPeer{name: fmt.Sprintf("session-%d", i), id: f.a,
			opts: client.Options{Session: &s, SessionID: fmt.Sprintf("claude-%d", i)}, bare: i == 3})
	}
	label := client.NewSession().Pubkey()
	peers = append(peers,
		&restartPeer{name: "member daemon", id: f.b, opts: client.Options{SessionID: "daemon-b"}},
		&restartPeer{name: "member cli", id: f.a, opts: client.Options{SessionID: "cli-a", SessionPubkey: label}})
	for _, p := range peers {
		p.c = first.Dial(p.id, p.opts)
		p.pid, p.token = p.c.HelloAck.PresenceID, p.c.HelloAck.ResumeToken
	}
	ghostKey := client.NewSession()
	ghost := first.Dial(f.b, client.Options{Session: &ghostKey, SessionID: "ghost"})
	joins := len(peers) + 1
	for range joins {
		waitFrame(t, observer, 10*time.Second, func(fr client.Frame) bool { return isEvent("peer_joined")(fr) || isEvent("peer_returned")(fr) })
	}
	// A hosts an MCP server: its entry follows the lease.
	rtRegister(t, peers[0].c, "X", false)
	waitFor(t, 20*time.Second, "MCP entry persisted", func() bool {
		var n int64
		db.Raw("SELECT count(*) FROM "+db.Table("meshbroker_realtime")+" WHERE kind = 'mcp' AND presence_id = ?", peers[0].pid).Scan(&n)
		return n == 1
	})
	// One session is already in grace when the broker goes away.
	inGrace := peers[1]
	inGrace.c.Kill()
	waitFor(t, 20*time.Second, "grace recorded in meshbroker_lease", func() bool {
		var states []string
		db.Raw("SELECT lease_state FROM "+db.Table("meshbroker_lease")+" WHERE presence_id = ?", inGrace.pid).Scan(&states)
		return len(states) == 1 && states[0] == "grace"
	})

	// A DM pushed to an online peer just before a crash, never confirmed
	// (no client_ack, no pong to a later ping yet), is pushed again on its
	// reattach (M3), not held back by the dead process's claim.
	pushedBeforeCrash := peers[2]
	var unconfirmed protocol.Ack
	if sig == syscall.SIGKILL {
		unconfirmed = dm(t, observer, client.Session{Key: f.c.Key}, *pushedBeforeCrash.opts.Session, "now", "just before the crash")
		if p := decodePush(t, waitFrame(t, pushedBeforeCrash.c, 10*time.Second, isMessage)); p.MessageID != unconfirmed.MessageID {
			t.Fatalf("pushed %s, want %s", p.MessageID, unconfirmed.MessageID)
		}
	}

	if err := first.Stop(sig, 60*time.Second); sig == syscall.SIGTERM && err != nil {
		t.Fatalf("first broker exit after SIGTERM: %v", err)
	}
	if sig == syscall.SIGTERM {
		for _, c := range []*client.Client{observer, ghost, peers[0].c} {
			<-c.Done()
			if ce := c.CloseError(); ce == nil || ce.Code != 1001 {
				t.Fatalf("close at SIGTERM: %+v", ce)
			}
		}
	}

	// The second process takes the first one's port over, as a restarted
	// deployment does.
	second := startChild(t, "second broker", st, first.Port(), lease)
	if !second.HasLogged("leases restored") {
		t.Fatal("second broker restored no lease")
	}
	obs := second.Dial(f.c, client.Options{SessionID: "observer"})
	if obs.HelloAck.PresenceID != observer.HelloAck.PresenceID {
		t.Fatalf("observer got presence %s, want %s", obs.HelloAck.PresenceID, observer.HelloAck.PresenceID)
	}
	// A call to the MCP server of a host not back yet fails at once (R3).
	if res := rtCallNow(t, obs, "X"); !strings.HasPrefix(res.Error, "host_unavailable") {
		t.Fatalf("call to a restored host in grace: %+v", res)
	}
	// A DM to a peer that has not reconnected yet is queued, not refused.
	target := peers[0]
	ack := dm(t, obs, client.Session{Key: f.c.Key}, *target.opts.Session, "next", "while you were away")
	if !ack.Queued {
		t.Fatalf("DM to a restored lease: %+v", ack)
	}
	for _, p := range peers {
		opts := p.opts
		switch {
		case p.bare:
			opts = clienttest.Mutate(opts, func(m map[string]any) {
				for _, k := range []string{"signature", "parentAttestation", "timestamp"} {
					delete(m, k)
				}
				m["resumeToken"] = p.token
			})
		case p.token != "":
			opts.ResumeToken = p.token
		}
		c := second.Dial(p.id, opts)
		if c.HelloAck.PresenceID != p.pid {
			t.Fatalf("%s got presence %s, want %s (ack %s)", p.name, c.HelloAck.PresenceID, p.pid, c.AckRaw)
		}
		p.c = c
	}
	if sig == syscall.SIGKILL {
		p := decodePush(t, waitFrame(t, pushedBeforeCrash.c, 10*time.Second, isMessage))
		if p.MessageID != unconfirmed.MessageID {
			t.Fatalf("after the crash pushed %s, want the unconfirmed %s again", p.MessageID, unconfirmed.MessageID)
		}
	}
	got := decodePush(t, waitFrame(t, target.c, 10*time.Second, isMessage))
	if got.MessageID != ack.MessageID {
		t.Fatalf("pushed %s, want %s", got.MessageID, ack.MessageID)
	}
	if body, err := client.Open(got.Nonce, got.Ciphertext, pub(f.c.Key), target.opts.Session.Key); err != nil || string(body) != "while you were away" {
		t.Fatalf("body %q %v", body, err)
	}

	// The ghost never comes back: exactly one peer_left when its window
	// ends, and no other presence event at the observer.
	var events []pushEvent
	waitFrame(t, obs, 10*lease, func(fr client.Frame) bool {
		if !isPresenceEvent(fr) {
			return false
		}
		p := decodePush(t, fr)
		events = append(events, p)
		return p.Event == "peer_left" && strings.Contains(string(p.EventData), ghostKey.Pubkey())
	})
	for _, fr := range collect(obs, 500*time.Millisecond, isPresenceEvent) {
		events = append(events, decodePush(t, fr))
	}
	if len(events) != 1 {
		t.Fatalf("observer saw %d presence events, want only the ghost's peer_left: %+v", len(events), events)
	}
	if dup := collect(target.c, 200*time.Millisecond, isMessage); len(dup) != 0 {
		t.Fatal("DM delivered twice")
	}
	var left int64
	db.Raw("SELECT count(*) FROM "+db.Table("meshbroker_lease")+" WHERE presence_id = ?", ghost.HelloAck.PresenceID).Scan(&left)
	if left != 0 {
		t.Fatal("expired lease row still stored")
	}
}

// A second broker on the same database waits for the first to let go,
// without listening, then restores its leases.
func TestSecondBrokerWaitsForFirst(t *testing.T) {
	t.Parallel() // its own storage, ports and processes
	const lease = 10 * time.Second
	st := brokerproc.NewStorage(t)
	f := newFixture(t, st.Bootstrap(t))
	first := startChild(t, "first broker", st, 0, lease)
	sess := client.NewSession()
	s := first.Dial(f.a, client.Options{Session: &sess, SessionID: "claude"})
	observer := first.Dial(f.b, client.Options{SessionID: "observer"})

	// The waiting broker's port is named up front (it does not listen yet,
	// so it could not be read back from a start line): the dial below
	// checks nothing accepts on it.
	second := newChild(t, "second broker", st, brokerproc.FreePort(t), lease)
	second.Launch()
	second.WaitLog("another broker owns this database", 60*time.Second)
	if _, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", second.Port()), time.Second); err == nil {
		t.Fatal("the waiting broker accepts connections")
	}
	if second.HasLogged("broker listening") {
		t.Fatal("the waiting broker listens")
	}
	if err := first.Stop(syscall.SIGTERM, 60*time.Second); err != nil {
		t.Fatalf("first broker exit after SIGTERM: %v", err)
	}
	second.WaitListening(60 * time.Second)
	obs := second.Dial(f.b, client.Options{SessionID: "observer"})
	again := second.Dial(f.a, client.Options{Session: &sess, SessionID: "claude"})
	if again.HelloAck.PresenceID != s.HelloAck.PresenceID || obs.HelloAck.PresenceID != observer.HelloAck.PresenceID {
		t.Fatalf("presence ids not kept across the handover: %s %s", again.AckRaw, obs.AckRaw)
	}
	if evs := collect(obs, 300*time.Millisecond, isPresenceEvent); len(evs) != 0 {
		t.Fatalf("handover visible: %s", evs[0].Raw)
	}
}
