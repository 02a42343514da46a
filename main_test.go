package main

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/internal/brokerproc"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// The end-to-end tests start a real broker on 127.0.0.1:0 through the same
// wiring main uses, on SQLite in a temp dir or, with TEST_DATABASE_URL, on
// a fresh Postgres database, and talk to it with the client package over
// real sockets with real keys. Durations are shrunk through config, so no
// test sleeps for seconds.

// TestMain raises the default of -test.parallel. The end-to-end tests spend
// most of their time waiting on sockets, timers and fsync, not on the CPU,
// so the default (GOMAXPROCS, 2 on the CI machine) leaves the cores idle.
// Every test that owns its broker and database calls t.Parallel; the few
// that count the process's goroutines or memory do not, and so run alone
// (the testing package runs every sequential top-level test before it
// releases the parallel ones). An explicit -test.parallel wins. On Postgres
// each test's database is a copy of one bootstrapped template, dropped when
// the tests end (modelstest.RunWithTemplates).
func TestMain(m *testing.M) {
	flag.Parse()
	explicit := false
	flag.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "test.parallel" })
	if !explicit {
		if err := flag.Set("test.parallel", strconv.Itoa(testParallelism())); err != nil {
			fmt.Fprintln(os.Stderr, "set -test.parallel:", err)
			os.Exit(2)
		}
	}
	// brokerproc.Main runs the tests, then removes the broker binary the
	// child-process tests (restart_test.go and others) built once.
	os.Exit(brokerproc.Main(func() int { return modelstest.RunWithTemplates(m) }))
}

// testParallelism is how many end-to-end tests run at once by default.
// Postgres bounds it too: each broker may open up to its pool's connections
// (test brokers use a small pool) against the server's max_connections.
func testParallelism() int { return 4 * runtime.GOMAXPROCS(0) }

type testBroker struct {
	*broker
	t     *testing.T
	cfg   config.Config
	clock *offsetClock
}

// offsetClock is the real clock plus an offset a test can move forward, so
// token buckets refill without the test sleeping; timers still run in real
// time.
type offsetClock struct{ offset atomic.Int64 }

func (c *offsetClock) now() time.Time { return time.Now().Add(time.Duration(c.offset.Load())) }

// advance moves the broker's clock forward by d.
func (b *testBroker) advance(d time.Duration) { b.clock.offset.Add(int64(d)) }

// localConfig is the default config on a free loopback port, with the
// test's own storage (SQLite in a temp dir, or a fresh Postgres database
// with TEST_DATABASE_URL) and the send limiter off. Tests and benchmarks
// both start from it.
func localConfig(tb testing.TB) config.Config {
	tb.Helper()
	cfg := config.Default()
	cfg.Host, cfg.Port = "127.0.0.1", 0
	if os.Getenv(modelstest.EnvDatabaseURL) != "" {
		cfg.DataDir = tb.TempDir()
		cfg.DatabaseURL = modelstest.BootstrappedPostgresURL(tb)
	} else {
		cfg.DataDir = modelstest.SeededDataDir(tb)
	}
	cfg.SendRatePerMin = 0
	return cfg
}

// testConfig is localConfig with every timer short.
func testConfig(t *testing.T) config.Config {
	t.Helper()
	cfg := localConfig(t)
	cfg.HelloTimeout = 30 * time.Second // tests of the timeout set their own; 40 hellos at once under -race on a busy machine took over 5 s
	cfg.LeaseTTL = 2 * time.Second
	cfg.ClaimLease = 30 * time.Second // the reference's; tests of expiry shrink it
	cfg.ClaimReapInterval = 100 * time.Millisecond
	cfg.DBHealthInterval = 50 * time.Millisecond
	cfg.QueueDepthInterval = 50 * time.Millisecond
	cfg.ShutdownTimeout = 10 * time.Second
	cfg.MemberCacheTTL = 0
	cfg.LogLevel = slog.LevelDebug
	return cfg
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// startTestBroker starts a broker whose config opts may change, and stops it
// when the test ends.
func startTestBroker(t *testing.T, opts ...func(*config.Config)) *testBroker {
	t.Helper()
	cfg := testConfig(t)
	for _, o := range opts {
		o(&cfg)
	}
	return startWithConfig(t, cfg)
}

func startWithConfig(t *testing.T, cfg config.Config) *testBroker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	clock := &offsetClock{}
	b, err := startBrokerWithClock(ctx, cfg, testLogger(t), clock.now)
	if err != nil {
		t.Fatalf("start broker: %v", err)
	}
	tb := &testBroker{broker: b, t: t, cfg: cfg, clock: clock}
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { tb.stop() }) })
	return tb
}

func (b *testBroker) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := b.Close(ctx); err != nil {
		b.t.Errorf("broker close: %v", err)
	}
}

func (b *testBroker) url() string { return fmt.Sprintf("ws://127.0.0.1:%d/ws", b.Port()) }

func (b *testBroker) httpURL(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", b.Port(), path)
}

// fixture is a mesh with members A, B, C (A is the admin owner) and a
// revoked member R.
type fixture struct {
	meshID  string
	name    string
	a, b, c client.Identity
	r       client.Identity
}

func (b *testBroker) fixture() fixture {
	b.t.Helper()
	return newFixture(b.t, b.db)
}

// newFixture provisions a fixture mesh on db.
func newFixture(t *testing.T, db *models.DB) fixture {
	t.Helper()
	ctx := context.Background()
	prov := services.NewProvisionService(db, time.Now)
	name := "mesh-" + models.NewID()[:6]
	owner, err := prov.CreateMesh(ctx, name, "", "alice")
	if err != nil {
		t.Fatal(err)
	}
	key, _ := owner.PrivateKey()
	f := fixture{meshID: owner.MeshID, name: name, a: client.Identity{MeshID: owner.MeshID, MemberID: owner.MemberID, DisplayName: "alice", Key: key}}
	add := func(n string) client.Identity {
		_, k, _ := ed25519.GenerateKey(nil)
		id, err := prov.AddMember(ctx, owner.MeshID, protocol.PubkeyHex(k), n, "member")
		if err != nil {
			t.Fatal(err)
		}
		return client.Identity{MeshID: owner.MeshID, MemberID: id.MemberID, DisplayName: n, Key: k}
	}
	f.b, f.c, f.r = add("bob"), add("carol"), add("rita")
	if _, err := prov.RevokeMember(ctx, owner.MeshID, f.r.MemberID); err != nil {
		t.Fatal(err)
	}
	return f
}

// connect opens a client and closes it when the test ends.
func (b *testBroker) connect(id client.Identity, opts client.Options) *client.Client {
	b.t.Helper()
	c, err := b.tryConnect(id, opts)
	if err != nil {
		b.t.Fatalf("connect %s: %v", id.DisplayName, err)
	}
	return c
}

func (b *testBroker) tryConnect(id client.Identity, opts client.Options) (*client.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if opts.HelloTimeout == 0 {
		opts.HelloTimeout = 30 * time.Second
	}
	if opts.Cwd == "" { // clienttest.Omit(opts, "cwd") still drops it
		opts.Cwd = "/work/" + id.DisplayName
	}
	c, err := client.Connect(ctx, b.url(), id, opts)
	if err != nil {
		return nil, err
	}
	b.t.Cleanup(func() { c.Kill() })
	return c, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// pushEvent is the part of a push the tests look at.
type pushEvent struct {
	Type               string          `json:"type"`
	Subtype            string          `json:"subtype"`
	Event              string          `json:"event"`
	EventData          json.RawMessage `json:"eventData"`
	MessageID          string          `json:"messageId"`
	MeshID             string          `json:"meshId"`
	SenderPubkey       string          `json:"senderPubkey"`
	SenderMemberPubkey string          `json:"senderMemberPubkey"`
	SenderName         string          `json:"senderName"`
	Priority           string          `json:"priority"`
	Nonce              string          `json:"nonce"`
	Ciphertext         string          `json:"ciphertext"`
	CreatedAt          string          `json:"createdAt"`
	Topic              string          `json:"topic"`
	ClientMessageID    string          `json:"client_message_id"`
}

// waitFrame returns the next frame of c matching match, failing after
// timeout. Non-matching frames are dropped.
func waitFrame(t *testing.T, c *client.Client, timeout time.Duration, match func(client.Frame) bool) client.Frame {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for {
		f, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for a frame: %v", err)
		}
		if match(f) {
			return f
		}
	}
}

// waitEvents waits for one push of each named event, in any order, and
// returns them by name. Other frames are dropped.
func waitEvents(t *testing.T, c *client.Client, timeout time.Duration, names ...string) map[string]client.Frame {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	got := map[string]client.Frame{}
	for len(got) < len(names) {
		f, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for %v (have %d): %v", names, len(got), err)
		}
		for _, n := range names {
			if _, seen := got[n]; !seen && isEvent(n)(f) {
				got[n] = f
				break
			}
		}
	}
	return got
}

// collect gathers every frame matching match that arrives within d.
func collect(c *client.Client, d time.Duration, match func(client.Frame) bool) []client.Frame {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var out []client.Frame
	for {
		f, err := c.Next(ctx)
		if err != nil {
			return out
		}
		if match(f) {
			out = append(out, f)
		}
	}
}

func isEvent(name string) func(client.Frame) bool {
	return func(f client.Frame) bool {
		if f.Type != "push" {
			return false
		}
		var p pushEvent
		_ = f.Decode(&p)
		return p.Subtype == "system" && p.Event == name
	}
}

func isMessage(f client.Frame) bool {
	if f.Type != "push" {
		return false
	}
	var p pushEvent
	_ = f.Decode(&p)
	return p.Subtype == ""
}

func decodePush(t *testing.T, f client.Frame) pushEvent {
	t.Helper()
	var p pushEvent
	if err := f.Decode(&p); err != nil {
		t.Fatal(err)
	}
	return p
}

// waitFor polls cond every few milliseconds until it holds.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// queryRow scans one row of raw SQL with {table} placeholders resolved.
func (b *testBroker) query(dst any, sql string, args ...any) {
	b.t.Helper()
	for _, name := range []string{"presence", "message_queue", "audit_log", "peer_state", "member", "pending_status", "topic", "topic_member", "topic_message", "state", "stream"} {
		sql = strings.ReplaceAll(sql, "{"+name+"}", b.db.Table(name))
	}
	if err := b.db.Raw(sql, args...).Scan(dst).Error; err != nil {
		b.t.Fatalf("query %q: %v", sql, err)
	}
}

func (b *testBroker) exec(sql string, args ...any) {
	b.t.Helper()
	for _, name := range []string{"presence", "message_queue", "audit_log", "peer_state", "member", "pending_status", "topic", "topic_member"} {
		sql = strings.ReplaceAll(sql, "{"+name+"}", b.db.Table(name))
	}
	if err := b.db.Exec(sql, args...).Error; err != nil {
		b.t.Fatalf("exec %q: %v", sql, err)
	}
}

// sealTo encrypts a small body for a recipient key.
func sealTo(t *testing.T, from ed25519.PrivateKey, to ed25519.PublicKey, body string) (string, string) {
	t.Helper()
	n, c, err := client.Seal([]byte(body), to, from)
	if err != nil {
		t.Fatal(err)
	}
	return n, c
}

func pub(k ed25519.PrivateKey) ed25519.PublicKey { return k.Public().(ed25519.PublicKey) }

// goroutinesSettle waits until the goroutine count is back near base.
func goroutinesSettle(t *testing.T, base int, slack int) {
	t.Helper()
	// Background peer_state saves of closed sockets queue on SQLite's one
	// connection; on a busy machine they took over 5 s to drain.
	deadline := time.Now().Add(30 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= base+slack {
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("goroutines: %d, started with %d\n%s", n, base, buf)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ctxT bounds a request that must be answered. Its deadline only costs
// time when the test fails: with fifty sends in flight on one socket of a
// loaded machine, the last ones took over 10 s.
func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitOffline waits until the broker has seen a killed client's socket close
// (its lease is offline), as a member-key reattach needs.
func (b *testBroker) waitOffline(presenceID string) {
	b.t.Helper()
	waitFor(b.t, 10*time.Second, "lease offline", func() bool {
		c := b.presence.Get(presenceID)
		return c != nil && !b.presence.Online(c)
	})
}
