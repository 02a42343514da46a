package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/internal/clienttest"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
	"github.com/claudemesh/meshbroker/protocol"
)

// Durable leases across a real process restart (issue 16): the broker binary
// runs as a child process, is stopped with SIGTERM or killed with SIGKILL,
// and started again on the same storage. Every peer that comes back inside
// the lease keeps its presence id, nobody sees a presence event, and a DM
// sent before the peer is back is delivered once after its hello_ack.

// childStorage is one test's database: a SQLite data dir, or a fresh
// Postgres database with TEST_DATABASE_URL.
type childStorage struct {
	dataDir string
	dbURL   string
}

func newChildStorage(t *testing.T) childStorage {
	st := childStorage{dataDir: t.TempDir()}
	if os.Getenv(modelstest.EnvDatabaseURL) != "" {
		st.dbURL = modelstest.FreshPostgresURL(t)
	}
	return st
}

// open bootstraps the storage and returns a handle for provisioning and
// inspection, closed when the test ends.
func (st childStorage) open(t *testing.T) *models.DB {
	t.Helper()
	db, err := models.Open(ctxT(t), st.dbURL, st.dataDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Bootstrap(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// buildBroker compiles the broker into a temp dir.
func buildBroker(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "meshbroker")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// child is one broker process.
type child struct {
	t    *testing.T
	cmd  *exec.Cmd
	port int
	name string

	mu     sync.Mutex
	lines  []string
	change chan struct{} // closed and replaced on every new line
	exited chan struct{}
	err    error // from Wait, once exited is closed
}

// startChild starts the binary with env on port and returns once it runs
// (not necessarily listening: see waitLog).
func startChild(t *testing.T, bin, name string, st childStorage, port int, lease time.Duration) *child {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"),
		"BROKER_HOST=127.0.0.1", "BROKER_PORT=" + strconv.Itoa(port), "DATA_DIR=" + st.dataDir,
		"LEASE_TTL_MS=" + strconv.FormatInt(lease.Milliseconds(), 10), "SEND_RATE_LIMIT_PER_MIN=0", "LOG_LEVEL=info",
	}
	if st.dbURL != "" {
		cmd.Env = append(cmd.Env, "DATABASE_URL="+st.dbURL)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	ch := &child{t: t, cmd: cmd, port: port, name: name, change: make(chan struct{}), exited: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go ch.read(stderr)
	t.Cleanup(func() {
		select {
		case <-ch.exited:
		default:
			_ = cmd.Process.Kill()
			<-ch.exited
		}
		if t.Failed() {
			ch.mu.Lock()
			t.Logf("%s log:\n%s", name, strings.Join(ch.lines, "\n"))
			ch.mu.Unlock()
		}
	})
	return ch
}

func (ch *child) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		ch.mu.Lock()
		ch.lines = append(ch.lines, sc.Text())
		close(ch.change)
		ch.change = make(chan struct{})
		ch.mu.Unlock()
	}
	ch.err = ch.cmd.Wait()
	close(ch.exited)
}

// waitLog waits for a log line containing substr.
func (ch *child) waitLog(substr string, timeout time.Duration) {
	ch.t.Helper()
	deadline := time.After(timeout)
	seen := 0
	for {
		ch.mu.Lock()
		for ; seen < len(ch.lines); seen++ {
			if strings.Contains(ch.lines[seen], substr) {
				ch.mu.Unlock()
				return
			}
		}
		change := ch.change
		ch.mu.Unlock()
		select {
		case <-change:
		case <-ch.exited:
			ch.t.Fatalf("%s exited (%v) before logging %q", ch.name, ch.err, substr)
		case <-deadline:
			ch.t.Fatalf("%s did not log %q within %v", ch.name, substr, timeout)
		}
	}
}

func (ch *child) hasLogged(substr string) bool {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for _, l := range ch.lines {
		if strings.Contains(l, substr) {
			return true
		}
	}
	return false
}

// stop sends sig and waits for the process to end.
func (ch *child) stop(sig syscall.Signal) {
	ch.t.Helper()
	if err := ch.cmd.Process.Signal(sig); err != nil {
		ch.t.Fatal(err)
	}
	select {
	case <-ch.exited:
	case <-time.After(60 * time.Second):
		ch.t.Fatalf("%s did not exit after %v", ch.name, sig)
	}
	if sig == syscall.SIGTERM && ch.err != nil {
		ch.t.Fatalf("%s exit after SIGTERM: %v", ch.name, ch.err)
	}
}

func (ch *child) url() string { return fmt.Sprintf("ws://127.0.0.1:%d/ws", ch.port) }

// dialChild connects to a child broker and closes the client when the test ends.
func dialChild(t *testing.T, ch *child, id client.Identity, opts client.Options) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if opts.Cwd == "" {
		opts.Cwd = "/work/" + id.DisplayName
	}
	c, err := client.Connect(ctx, ch.url(), id, opts)
	if err != nil {
		t.Fatalf("connect %s to %s: %v", id.DisplayName, ch.name, err)
	}
	t.Cleanup(c.Kill)
	return c
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
	const lease = 6 * time.Second
	bin := buildBroker(t)
	st := newChildStorage(t)
	db := st.open(t)
	f := newFixture(t, db)
	port := freePort(t)
	first := startChild(t, bin, "first broker", st, port, lease)
	first.waitLog("broker listening", 60*time.Second)

	observer := dialChild(t, first, f.c, client.Options{SessionID: "observer"})
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
		p.c = dialChild(t, first, p.id, p.opts)
		p.pid, p.token = p.c.HelloAck.PresenceID, p.c.HelloAck.ResumeToken
	}
	ghostKey := client.NewSession()
	ghost := dialChild(t, first, f.b, client.Options{Session: &ghostKey, SessionID: "ghost"})
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

	first.stop(sig)
	if sig == syscall.SIGTERM {
		for _, c := range []*client.Client{observer, ghost, peers[0].c} {
			<-c.Done()
			if ce := c.CloseError(); ce == nil || ce.Code != 1001 {
				t.Fatalf("close at SIGTERM: %+v", ce)
			}
		}
	}

	second := startChild(t, bin, "second broker", st, port, lease)
	second.waitLog("broker listening", 60*time.Second)
	if !second.hasLogged("leases restored") {
		t.Fatal("second broker restored no lease")
	}
	obs := dialChild(t, second, f.c, client.Options{SessionID: "observer"})
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
		c := dialChild(t, second, p.id, opts)
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
	const lease = 10 * time.Second
	bin := buildBroker(t)
	st := newChildStorage(t)
	f := newFixture(t, st.open(t))
	first := startChild(t, bin, "first broker", st, freePort(t), lease)
	first.waitLog("broker listening", 60*time.Second)
	sess := client.NewSession()
	s := dialChild(t, first, f.a, client.Options{Session: &sess, SessionID: "claude"})
	observer := dialChild(t, first, f.b, client.Options{SessionID: "observer"})

	second := startChild(t, bin, "second broker", st, freePort(t), lease)
	second.waitLog("another broker owns this database", 60*time.Second)
	if _, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", second.port), time.Second); err == nil {
		t.Fatal("the waiting broker accepts connections")
	}
	if second.hasLogged("broker listening") {
		t.Fatal("the waiting broker listens")
	}
	first.stop(syscall.SIGTERM)
	second.waitLog("broker listening", 60*time.Second)
	obs := dialChild(t, second, f.b, client.Options{SessionID: "observer"})
	again := dialChild(t, second, f.a, client.Options{Session: &sess, SessionID: "claude"})
	if again.HelloAck.PresenceID != s.HelloAck.PresenceID || obs.HelloAck.PresenceID != observer.HelloAck.PresenceID {
		t.Fatalf("presence ids not kept across the handover: %s %s", again.AckRaw, obs.AckRaw)
	}
	if evs := collect(obs, 300*time.Millisecond, isPresenceEvent); len(evs) != 0 {
		t.Fatalf("handover visible: %s", evs[0].Raw)
	}
}
