package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/internal/brokerproc"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// Operating the broker: health bodies, the start line, /ws without an
// upgrade, the healthcheck subcommand, the admin listener, the metrics an
// operator looks for and a database that is not up at start.

// lockedBuffer collects log lines from the broker's goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// logLines decodes the JSON lines logged so far whose msg is msg.
func (b *lockedBuffer) logLines(t *testing.T, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(b.String(), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line is not JSON: %q", l)
		}
		if m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// startLoggedBroker starts a test broker that logs JSON (the production
// handler) into the returned buffer at level.
func startLoggedBroker(t *testing.T, level string, opts ...func(*config.Config)) (*testBroker, *lockedBuffer) {
	t.Helper()
	cfg := testConfig(t)
	for _, o := range opts {
		o(&cfg)
	}
	var lvl config.Config
	lvl.LogLevel.UnmarshalText([]byte(level))
	logs := &lockedBuffer{}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	clock := &offsetClock{}
	b, err := startBrokerWithClock(ctx, cfg, newLogger(logs, lvl.LogLevel), clock.now)
	if err != nil {
		t.Fatalf("start broker: %v", err)
	}
	tb := &testBroker{broker: b, t: t, cfg: cfg, clock: clock}
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { tb.stop() }) })
	return tb, logs
}

// /health/ready names the database state, and /health's gitSha is the
// start line's, set or not.
func TestHealthBodiesAndStartLineAgree(t *testing.T) {
	t.Parallel()
	for _, sha := range []string{"", "abc1234"} {
		t.Run("GIT_SHA="+sha, func(t *testing.T) {
			b, logs := startLoggedBroker(t, "info", func(c *config.Config) { c.GitSHA = sha })
			code, _, body := httpDo(t, "GET", b.httpURL("/health/ready"), "")
			var ready map[string]any
			if code != 200 || json.Unmarshal([]byte(body), &ready) != nil || ready["db"] != "up" || ready["status"] != "ready" {
				t.Fatalf("/health/ready %d %s", code, body)
			}
			_, _, body = httpDo(t, "GET", b.httpURL("/health"), "")
			var live map[string]any
			_ = json.Unmarshal([]byte(body), &live)
			start := logs.logLines(t, "broker listening")
			if len(start) != 1 {
				t.Fatalf("start lines: %v", start)
			}
			want := sha
			if want == "" {
				want = "unknown"
			}
			if live["gitSha"] != want || start[0]["gitSha"] != want || ready["gitSha"] != want {
				t.Fatalf("gitSha: /health %v, /health/ready %v, start line %v; want %q", live["gitSha"], ready["gitSha"], start[0]["gitSha"], want)
			}
			for _, k := range []string{"host", "port", "data_dir", "db", "max_message_bytes", "max_connections_per_mesh", "lease_ttl_ms", "admin_addr"} {
				if b.db.Dialect == models.DialectPostgres && k == "data_dir" {
					continue
				}
				if _, ok := start[0][k]; !ok {
					t.Errorf("start line lacks %s: %v", k, start[0])
				}
			}
		})
	}
}

// A plain GET /ws is 426 with a JSON hint; other targets stay 404.
func TestPlainGetOnWSIs426(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	code, hdr, body := httpDo(t, "GET", b.httpURL("/ws"), "")
	var e map[string]string
	if code != 426 || json.Unmarshal([]byte(body), &e) != nil || !strings.Contains(e["error"], "WebSocket") ||
		!strings.EqualFold(hdr.Get("Upgrade"), "websocket") || !strings.HasPrefix(hdr.Get("Content-Type"), "application/json") {
		t.Fatalf("GET /ws: %d %v %s", code, hdr, body)
	}
	if code, _, _ := httpDo(t, "GET", b.httpURL("/ws?x=1"), ""); code != 404 {
		t.Fatalf("GET /ws?x=1: %d", code)
	}
}

// healthcheck probes BROKER_HOST when it is a specific address, and
// loopback for the wildcard.
func TestHealthcheckProbesBrokerHost(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.Host = "127.0.0.2" })
	port := strconv.Itoa(b.Port())
	hc := func(env map[string]string) (int, string) {
		var errb bytes.Buffer
		code := run([]string{"healthcheck"}, func(k string) string { return env[k] }, io.Discard, &errb)
		return code, errb.String()
	}
	if code, errs := hc(map[string]string{"BROKER_HOST": "127.0.0.2", "BROKER_PORT": port}); code != 0 {
		t.Fatalf("healthcheck on 127.0.0.2: %d %s", code, errs)
	}
	// Nothing listens on 127.0.0.1 at that port: the wildcard probes
	// loopback and must fail here, which shows it did not probe 127.0.0.2.
	if code, _ := hc(map[string]string{"BROKER_HOST": "0.0.0.0", "BROKER_PORT": port}); code == 0 {
		t.Fatal("healthcheck with BROKER_HOST=0.0.0.0 reached a broker on 127.0.0.2")
	}
	w := startTestBroker(t, func(c *config.Config) { c.Host = "0.0.0.0" })
	if code, errs := hc(map[string]string{"BROKER_HOST": "0.0.0.0", "BROKER_PORT": strconv.Itoa(w.Port())}); code != 0 {
		t.Fatalf("healthcheck for a wildcard broker: %d %s", code, errs)
	}
}

// pprof is served on the admin listener only, never on the public port.
func TestPprofOnlyOnAdminListener(t *testing.T) {
	t.Parallel()
	off := startTestBroker(t)
	if off.AdminAddr() != "" {
		t.Fatalf("admin listener without ADMIN_ADDR: %s", off.AdminAddr())
	}
	b := startTestBroker(t, func(c *config.Config) { c.AdminAddr = "127.0.0.1:0" })
	for _, p := range []string{"/debug/pprof/", "/debug/pprof/goroutine?debug=1", "/debug/pprof/cmdline"} {
		if code, _, _ := httpDo(t, "GET", b.httpURL(p), ""); code != 404 {
			t.Errorf("public port serves %s: %d", p, code)
		}
	}
	code, _, body := httpDo(t, "GET", "http://"+b.AdminAddr()+"/debug/pprof/goroutine?debug=1", "")
	if code != 200 || !strings.Contains(body, "goroutine profile:") {
		t.Fatalf("admin pprof: %d %.200s", code, body)
	}
	if code, _, _ := httpDo(t, "GET", "http://"+b.AdminAddr()+"/metrics", ""); code != 404 {
		t.Fatalf("admin listener serves more than pprof: %d", code)
	}
}

// metricValue reads one sample (name with its labels, as exposed) from
// /metrics; a histogram is read through its _count.
func metricValue(t *testing.T, b *testBroker, sample string) float64 {
	t.Helper()
	_, _, body := httpDo(t, "GET", b.httpURL("/metrics"), "")
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(sample) + ` (\S+)$`)
	m := re.FindStringSubmatch(body)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatalf("%s: %v", sample, err)
	}
	return v
}

// The operator's metrics move with a scripted session: hello, a DM pushed
// and acked, a close.
func TestOperatorMetricsMove(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.GitSHA = "feedbee" })
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	// Until a connection's first client_ack, a push it has answered a ping
	// after counts as received (M3) and no longer waits for an ack, so the
	// first ack can miss the histogram when the pong wins; the pushes after
	// it wait for their acks and are timed. Up to 20 DMs, each acked.
	observed := false
	for i := 0; i < 20 && !observed; i++ {
		if ack, err := a.SendSealed(ctxT(t), f.b.Pubkey(), pub(f.b.Key), "now", []byte("hi")); err != nil || !ack.Queued {
			t.Fatal(ack, err)
		}
		p := decodePush(t, waitFrame(t, bob, 10*time.Second, isMessage))
		if err := bob.ClientAck(p.MessageID, ""); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(2 * time.Second)
		for !observed && time.Now().Before(deadline) {
			observed = metricValue(t, b, "meshbroker_push_ack_seconds_count") >= 1
			time.Sleep(5 * time.Millisecond)
		}
	}
	if !observed {
		t.Fatal("no push_ack latency observed after 20 acked DMs")
	}
	if err := bob.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "close counted", func() bool {
		return metricValue(t, b, `meshbroker_ws_closes_total{by="peer",code="1000"}`) >= 1
	})
	for _, s := range []string{
		"meshbroker_ws_frames_received_total", "meshbroker_ws_frames_sent_total",
		"meshbroker_ws_received_bytes_total", "meshbroker_ws_sent_bytes_total",
		`meshbroker_hello_seconds_count{kind="hello",result="ok"}`,
		`meshbroker_db_query_seconds_count{op="raw"}`, `meshbroker_db_query_seconds_count{op="row"}`,
		"meshbroker_queue_drain_seconds_count",
		fmt.Sprintf(`meshbroker_build_info{goversion="%s",revision="feedbee",version="0.1.0"}`, runtime.Version()),
	} {
		if v := metricValue(t, b, s); v < 1 {
			t.Errorf("%s = %v, want ≥ 1", s, v)
		}
	}
	if v := metricValue(t, b, `meshbroker_db_errors_total{op="raw"}`); v != 0 {
		t.Errorf("db errors after a clean session: %v", v)
	}
	// A statement that fails is counted.
	_ = b.db.Exec("SELECT * FROM no_such_table").Error
	if v := metricValue(t, b, `meshbroker_db_errors_total{op="raw"}`); v != 1 {
		t.Errorf("db errors after a failing statement: %v, want 1", v)
	}
}

// Log lines an operator reads: member hellos say kind member, a session's
// end names its remote address and close code, and a hook request logs no
// cwd at info.
func TestOperatorLogLines(t *testing.T) {
	t.Parallel()
	b, logs := startLoggedBroker(t, "info")
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	postHook(t, b, `{"cwd":"/home/secret/project","pid":4242,"status":"working"}`)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "session end line", func() bool { return len(logs.logLines(t, "ws session end")) == 1 })
	hello := logs.logLines(t, "ws hello")
	if len(hello) != 1 || hello[0]["kind"] != "member" || hello[0]["remote"] == "" || hello[0]["role"] != nil {
		t.Fatalf("hello line: %v", hello)
	}
	end := logs.logLines(t, "ws session end")[0]
	if end["code"] != float64(1000) || end["by"] != "peer" || !strings.HasPrefix(fmt.Sprint(end["remote"]), "127.0.0.1:") || end["presence_id"] == nil {
		t.Fatalf("session end line: %v", end)
	}
	if strings.Contains(logs.String(), "/home/secret/project") {
		t.Fatalf("a hook's cwd was logged at info:\n%s", logs.String())
	}
}

// A Postgres that is not listening yet: start retries with backoff, logs
// every attempt and gives up after DB_START_TIMEOUT_MS with a clear error.
func TestDatabaseNotUpGivesUpAfterTimeout(t *testing.T) {
	t.Parallel()
	port := brokerproc.FreePort(t)
	var out, errb lockedBuffer
	env := map[string]string{
		"DATABASE_URL": fmt.Sprintf("postgres://postgres@127.0.0.1:%d/none?sslmode=disable&connect_timeout=2", port),
		// Long enough for three attempts (backoff 250, 500 ms) even when an
		// attempt takes a few hundred ms on a loaded machine.
		"DB_START_TIMEOUT_MS": "1500",
		"BROKER_PORT":         "0",
		"BROKER_HOST":         "127.0.0.1",
	}
	started := time.Now()
	code := run(nil, func(k string) string { return env[k] }, &out, &errb)
	elapsed := time.Since(started)
	if code != 1 {
		t.Fatalf("exit %d, want 1\n%s", code, errb.String())
	}
	attempts := errb.logLines(t, "database not reachable, retrying")
	final := errb.logLines(t, "start")
	if len(attempts) < 2 || len(final) != 1 || !strings.Contains(fmt.Sprint(final[0]["err"]), "not reachable after") ||
		!strings.Contains(fmt.Sprint(final[0]["err"]), "DB_START_TIMEOUT_MS=1500") {
		t.Fatalf("attempts %d, final %v\n%s", len(attempts), final, errb.String())
	}
	if elapsed < 1500*time.Millisecond {
		t.Fatalf("gave up after %s, before the 1500 ms it was given", elapsed)
	}
	for i, a := range attempts {
		if a["attempt"] != float64(i+1) || a["retry_in_ms"] == nil || a["err"] == nil {
			t.Fatalf("attempt line %d: %v", i, a)
		}
	}
	if strings.Contains(errb.String(), "password") {
		t.Fatal("connection details leaked")
	}
}

// A Postgres that starts listening while the broker waits: the broker comes
// up once it answers. The late listener is a TCP relay to the test server,
// opened after the first failed attempt.
func TestDatabaseComingUpLateIsWaitedFor(t *testing.T) {
	t.Parallel()
	real := os.Getenv(modelstest.EnvDatabaseURL)
	if real == "" {
		t.Skip("needs TEST_DATABASE_URL: a server to come up")
	}
	target := modelstest.FreshPostgresURL(t)
	port := brokerproc.FreePort(t)
	realHost := hostOf(t, target)
	late := strings.Replace(target, realHost, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 1)
	logs := &lockedBuffer{}
	cfg := testConfig(t)
	cfg.DatabaseURL = late
	cfg.DBStartTimeout = 30 * time.Second
	cfg.DBRetryMin, cfg.DBRetryMax = 20*time.Millisecond, 200*time.Millisecond
	type result struct {
		b   *broker
		err error
	}
	done := make(chan result, 1)
	go func() {
		b, err := startBroker(context.Background(), cfg, newLogger(logs, cfg.LogLevel))
		done <- result{b, err}
	}()
	waitFor(t, 10*time.Second, "a failed attempt", func() bool {
		return len(logs.logLines(t, "database not reachable, retrying")) > 0
	})
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go relay(ln, realHost)
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("broker did not start once the database came up")
	}
	if r.err != nil {
		t.Fatalf("start: %v", r.err)
	}
	tb := &testBroker{broker: r.b, t: t, cfg: cfg}
	t.Cleanup(tb.stop)
	if len(logs.logLines(t, "database up")) != 1 {
		t.Fatalf("no database up line:\n%s", logs.String())
	}
	if code, _, _ := httpDo(t, "GET", tb.httpURL("/health/ready"), ""); code != 200 {
		t.Fatalf("ready: %d", code)
	}
}

// hostOf is the host:port of a postgres:// URL.
func hostOf(t *testing.T, url string) string {
	t.Helper()
	m := regexp.MustCompile(`^postgres(?:ql)?://[^@/]*@([^/?]+)`).FindStringSubmatch(url)
	if m == nil {
		t.Fatalf("no host in %s", url)
	}
	return m[1]
}

// relay forwards every connection accepted on ln to addr until ln closes.
func relay(ln net.Listener, addr string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			up, err := net.Dial("tcp", addr)
			if err != nil {
				return
			}
			defer up.Close()
			go func() { _, _ = io.Copy(up, c); up.Close() }()
			_, _ = io.Copy(c, up)
		}()
	}
}

// EXPECTED_MIGRATION's help lists the version this build records.
func TestExpectedMigrationHelpNamesSchemaVersion(t *testing.T) {
	t.Parallel()
	if config.KnownSchemaVersions != models.SchemaVersion || !strings.Contains(config.Usage(), models.SchemaVersion) {
		t.Fatalf("EXPECTED_MIGRATION help says %q, the schema is %q", config.KnownSchemaVersions, models.SchemaVersion)
	}
}

// A socket whose peer goes quiet past the pong timeout is logged once, as
// "ws stale terminate", with each key once (it had presence_id twice).
func TestStaleTerminateLogLine(t *testing.T) {
	t.Parallel()
	// The heartbeat is far off, so the read deadline ends the socket
	// before the watchdog looks at it.
	// The pong timeout also bounds the wait for the hello's answer to
	// be written: 200 ms ran out before hello_ack on a loaded machine.
	b, logs := startLoggedBroker(t, "info", func(c *config.Config) { c.PingInterval, c.PongTimeout = 10*time.Second, 2*time.Second })
	f := b.fixture()
	c := b.connect(f.a, client.Options{})
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("quiet socket not ended")
	}
	waitFor(t, 10*time.Second, "stale terminate line", func() bool { return len(logs.logLines(t, "ws stale terminate")) == 1 })
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, `"ws stale terminate"`) {
			if n := strings.Count(l, `"presence_id":`); n != 1 {
				t.Fatalf("presence_id %d times: %s", n, l)
			}
			if !strings.Contains(l, `"presence_id":"`+c.HelloAck.PresenceID+`"`) {
				t.Fatalf("wrong presence: %s", l)
			}
		}
	}
}
