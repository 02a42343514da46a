// Package brokerproc runs the real meshbroker binary as a child process for
// tests that need what an in-process broker cannot give: a kill -9, a
// SIGTERM and its exit status, a restart on the same storage, the process's
// own memory.
//
// A test package that uses it routes its TestMain through Main, which
// removes the binary Binary built once for the whole test binary:
//
//	func TestMain(m *testing.M) { os.Exit(brokerproc.Main(m.Run)) }
//
// A Broker is one configured child (storage, environment, port) that can be
// started, signalled and started again. Its first start listens on a port
// the kernel picks (BROKER_PORT=0) and reads it back from the start line,
// so parallel tests never race for a port; later starts bind that same port
// again, as a restarted deployment would, and retry while it is still taken.
//
// Concurrency: the methods that may fail the test are called from its
// goroutine; Logs, Port, URL, HTTPURL and Kill from any. Each run has one
// goroutine that reads the child's stdout and stderr into the log and one
// that reaps the child; lines, the port and the current run are guarded by
// Broker.mu.
package brokerproc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
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
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// The margins below are far above what a start or a dial takes (about a
// second on a busy 2-core machine under -race), so they hold at 10x slower.
const (
	startTimeout = 60 * time.Second // from exec to the start line and a ready /health/ready
	dialTimeout  = 20 * time.Second // one client.Connect
	retryEvery   = 250 * time.Millisecond
	dumpLines    = 400 // lines of a failed test's broker log written to the test log
)

// build is the binary Binary compiles, once per test binary.
var build struct {
	mainRan bool // set by Main before any test runs
	once    sync.Once
	dir     string // removed by Main once the tests ran
	path    string
	err     error
}

// Main runs the package's tests and removes the broker binary built for
// them; its result is the exit code. run is m.Run, or a TestMain body that
// calls it (such as modelstest.RunWithTemplates).
func Main(run func() int) int {
	build.mainRan = true
	code := run()
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
	return code
}

// Binary returns the broker binary, built with `go build` from the module
// root on the first call (the same command every time, so the build cache
// serves every package that asks). The package's TestMain must go through
// Main, which removes it: a t.Cleanup cannot, since the binary outlives the
// test that built it.
func Binary(t testing.TB) string {
	t.Helper()
	if !build.mainRan {
		t.Fatal("brokerproc: this package's TestMain must call brokerproc.Main, which removes the built binary")
	}
	build.once.Do(func() {
		began := time.Now()
		root, err := moduleRoot()
		if err != nil {
			build.err = err
			return
		}
		if build.dir, build.err = os.MkdirTemp("", "meshbroker-bin-"); build.err != nil {
			return
		}
		build.path = filepath.Join(build.dir, "meshbroker")
		cmd := exec.Command("go", "build", "-o", build.path, ".")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			build.err = fmt.Errorf("go build in %s: %w\n%s", root, err, out)
			return
		}
		t.Logf("brokerproc: broker built in %v", time.Since(began).Round(time.Millisecond))
	})
	if build.err != nil {
		t.Fatalf("brokerproc: %v", build.err)
	}
	return build.path
}

// moduleRoot is the nearest directory at or above the working directory
// (the package under test) holding go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("module root: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		up := filepath.Dir(dir)
		if up == dir {
			return "", errors.New("module root: no go.mod above the working directory")
		}
		dir = up
	}
}

// FreePort returns a loopback port that was free a moment ago, for a
// listener that has to be named before it exists. Prefer a Broker's own
// port, which is never given up between its pick and its bind.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("brokerproc: find a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Storage is where a child broker keeps its data.
type Storage struct {
	DataDir     string // DATA_DIR: the SQLite database's directory (set on Postgres too, so nothing lands in the working directory)
	DatabaseURL string // DATABASE_URL; "" for the embedded SQLite
}

// NewStorage is a fresh, empty storage for one test: SQLite in a temporary
// directory, or with TEST_DATABASE_URL set a fresh Postgres database on
// that server (dropped when the test ends).
func NewStorage(t testing.TB) Storage {
	t.Helper()
	if os.Getenv(modelstest.EnvDatabaseURL) != "" {
		return PostgresStorage(t)
	}
	return SQLiteStorage(t)
}

// SQLiteStorage is a fresh SQLite storage in a temporary directory.
func SQLiteStorage(t testing.TB) Storage { return Storage{DataDir: t.TempDir()} }

// PostgresStorage is a fresh database on TEST_DATABASE_URL's server; the
// test is skipped when it is unset.
func PostgresStorage(t testing.TB) Storage {
	t.Helper()
	return Storage{DataDir: t.TempDir(), DatabaseURL: modelstest.FreshPostgresURL(t)}
}

// Env is the storage as the child's environment.
func (s Storage) Env() []string {
	env := []string{"DATA_DIR=" + s.DataDir}
	if s.DatabaseURL != "" {
		env = append(env, "DATABASE_URL="+s.DatabaseURL)
	}
	return env
}

// Open opens the storage from the test process, for provisioning before a
// broker starts and for inspection after; it is closed when the test ends.
// On SQLite, open it while no child writes or after the child stopped.
func (s Storage) Open(t testing.TB) *models.DB {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	db, err := models.Open(ctx, s.DatabaseURL, s.DataDir, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("brokerproc: open the broker's database: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// Bootstrap is Open followed by the schema bootstrap a broker's start runs.
func (s Storage) Bootstrap(t testing.TB) *models.DB {
	t.Helper()
	db := s.Open(t)
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := db.Bootstrap(ctx); err != nil {
		t.Fatalf("brokerproc: bootstrap: %v", err)
	}
	return db
}

// Options configure a Broker.
type Options struct {
	Name    string   // in failures and the log dump; "broker" when empty
	Storage Storage  // required
	Env     []string // KEY=VALUE on top of the defaults (LOG_LEVEL=info); later entries win
	// Port pins the listening port from the first start (FreePort): only
	// for a test that has to know it before the broker listens, or that
	// takes a port over from another Broker. 0 lets the kernel pick.
	Port int
}

// Broker is the meshbroker binary as a child process, started and
// restarted on one storage and one port.
type Broker struct {
	t    testing.TB
	name string
	bin  string
	env  []string // static after New, BROKER_PORT excluded

	mu     sync.Mutex
	port   int // 0 until a run logged its start line (or Options.Port)
	lines  []string
	change chan struct{} // closed and replaced on every new line
	run    *run          // the latest run; nil before the first start
}

// run is one process of a Broker.
type run struct {
	cmd    *exec.Cmd
	from   int           // index in Broker.lines of its first line
	exited chan struct{} // closed once it was reaped and its output read
	err    error         // Wait's result, set before exited closes
}

// New prepares a broker; nothing runs until Start or Launch. When the test
// ends the running process is killed, and if the test failed the log is
// written to the test log.
func New(t testing.TB, opts Options) *Broker {
	t.Helper()
	name := opts.Name
	if name == "" {
		name = "broker"
	}
	// A clean environment: the test's own DATABASE_URL and the like must
	// never leak into the child.
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "BROKER_HOST=127.0.0.1", "LOG_LEVEL=info"}
	if tmp := os.Getenv("TMPDIR"); tmp != "" {
		env = append(env, "TMPDIR="+tmp)
	}
	env = append(append(env, opts.Storage.Env()...), opts.Env...)
	if level := strings.ToLower(lookup(env, "LOG_LEVEL")); opts.Port == 0 && level != "info" && level != "debug" && level != "" {
		t.Fatalf("brokerproc: %s: LOG_LEVEL=%s hides the start line its port is read from: log at info or set Options.Port", name, level)
	}
	b := &Broker{t: t, name: name, bin: Binary(t), env: env, port: opts.Port, change: make(chan struct{})}
	t.Cleanup(func() {
		b.Kill()
		if t.Failed() {
			t.Logf("%s log:\n%s", name, b.tail(dumpLines))
		}
	})
	return b
}

// lookup is the value env gives key (its last entry, as exec uses).
func lookup(env []string, key string) string {
	v := ""
	for _, kv := range env {
		if k, val, ok := strings.Cut(kv, "="); ok && k == key {
			v = val
		}
	}
	return v
}

// Start starts the broker and returns once it listens and /health/ready
// answers 200. A start on a port that is still taken (a restart whose port
// someone grabbed meanwhile) is retried until the start timeout.
func (b *Broker) Start() {
	b.t.Helper()
	deadline := time.Now().Add(startTimeout)
	for {
		b.Launch()
		err := b.waitListening(deadline)
		if err == nil {
			return
		}
		if errors.Is(err, errPortTaken) && time.Now().Add(retryEvery).Before(deadline) {
			time.Sleep(retryEvery) // the port's holder is another test's connection or listener; it goes
			continue
		}
		b.t.Fatalf("%s: %v", b.name, err)
	}
}

// Launch starts the broker and returns at once: it may be waiting for the
// database, or for another broker to let go of it (see WaitLog and
// WaitListening).
func (b *Broker) Launch() {
	b.t.Helper()
	b.mu.Lock()
	if b.run != nil && !b.exitedLocked() {
		b.mu.Unlock()
		b.t.Fatalf("%s: started while it runs", b.name)
	}
	port := b.port
	b.mu.Unlock()
	cmd := exec.Command(b.bin)
	// Env's later entries win: BROKER_PORT comes after the options' Env.
	cmd.Env = append(append([]string(nil), b.env...), "BROKER_PORT="+strconv.Itoa(port))
	pr, pw, err := os.Pipe()
	if err != nil {
		b.t.Fatalf("%s: %v", b.name, err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	err = cmd.Start()
	pw.Close() // the child holds its copy; EOF comes when it exits
	if err != nil {
		pr.Close()
		b.t.Fatalf("%s: start %s: %v", b.name, b.bin, err)
	}
	b.mu.Lock()
	r := &run{cmd: cmd, from: len(b.lines), exited: make(chan struct{})}
	b.run = r
	b.mu.Unlock()
	read := make(chan struct{})
	go func() { defer close(read); b.read(pr) }()
	go func() {
		err := cmd.Wait()
		<-read // every line is in before exited closes
		r.err = err
		close(r.exited)
	}()
}

// read appends the child's output to the log, line by line, however long
// the lines (a stalled reader would block the child on its stderr).
func (b *Broker) read(pr *os.File) {
	defer pr.Close()
	br := bufio.NewReader(pr)
	for {
		line, err := br.ReadString('\n')
		if line = strings.TrimSuffix(line, "\n"); line != "" || err == nil {
			b.mu.Lock()
			b.lines = append(b.lines, line)
			close(b.change)
			b.change = make(chan struct{})
			b.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

var errPortTaken = errors.New("port taken")

// WaitListening waits for the current run's start line and a ready
// /health/ready (after Launch, when the broker was waiting).
func (b *Broker) WaitListening(timeout time.Duration) {
	b.t.Helper()
	if err := b.waitListening(time.Now().Add(timeout)); err != nil {
		b.t.Fatalf("%s: %v", b.name, err)
	}
}

func (b *Broker) waitListening(deadline time.Time) error {
	r := b.current()
	seen := r.from
	for exited := false; ; {
		b.mu.Lock()
		for ; seen < len(b.lines); seen++ {
			if port, ok := startLine(b.lines[seen]); ok {
				if b.port != 0 && port != b.port {
					b.mu.Unlock()
					return fmt.Errorf("listens on port %d, want %d", port, b.port)
				}
				b.port = port
				b.mu.Unlock()
				return b.waitReady(r, deadline)
			}
		}
		change := b.change
		b.mu.Unlock()
		if exited { // every line of the run was scanned
			if b.runLogged(r, "address already in use") {
				return fmt.Errorf("%w: exited (%v) before listening: port %d is in use", errPortTaken, r.err, b.Port())
			}
			return fmt.Errorf("exited (%v) before listening", r.err)
		}
		select {
		case <-change:
		case <-r.exited:
			exited = true // scan what came in before the exit once more
		case <-time.After(time.Until(deadline)):
			return fmt.Errorf("did not log its start line (\"broker listening\", at LOG_LEVEL info) in time")
		}
	}
}

// startLine reads the port off the start line.
func startLine(line string) (int, bool) {
	if !strings.Contains(line, `"broker listening"`) {
		return 0, false
	}
	var l struct {
		Msg  string `json:"msg"`
		Port int    `json:"port"`
	}
	if json.Unmarshal([]byte(line), &l) != nil || l.Msg != "broker listening" || l.Port == 0 {
		return 0, false
	}
	return l.Port, true
}

// waitReady polls /health/ready (the route a deployment's health check
// uses) until it answers 200.
func (b *Broker) waitReady(r *run, deadline time.Time) error {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	url := b.HTTPURL("/health/ready")
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-r.exited:
			return fmt.Errorf("exited (%v) before /health/ready answered 200", r.err)
		case <-ctx.Done():
			return fmt.Errorf("/health/ready did not answer 200 in time")
		case <-time.After(50 * time.Millisecond): // polling the readiness route
		}
	}
}

func (b *Broker) current() *run {
	b.t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.run == nil {
		b.t.Fatalf("%s: not started", b.name)
	}
	return b.run
}

func (b *Broker) exitedLocked() bool {
	select {
	case <-b.run.exited:
		return true
	default:
		return false
	}
}

// WaitLog waits for a line of the current run containing substr; the test
// fails if the process exits first or timeout passes.
func (b *Broker) WaitLog(substr string, timeout time.Duration) {
	b.t.Helper()
	r := b.current()
	deadline := time.After(timeout)
	seen := r.from
	for exited := false; ; {
		b.mu.Lock()
		for ; seen < len(b.lines); seen++ {
			if strings.Contains(b.lines[seen], substr) {
				b.mu.Unlock()
				return
			}
		}
		change := b.change
		b.mu.Unlock()
		if exited { // every line of the run was scanned
			b.t.Fatalf("%s exited (%v) before logging %q", b.name, r.err, substr)
		}
		select {
		case <-change:
		case <-r.exited:
			exited = true // scan what came in before the exit once more
		case <-deadline:
			b.t.Fatalf("%s did not log %q within %v", b.name, substr, timeout)
		}
	}
}

// HasLogged reports whether the current run logged a line containing
// substr so far.
func (b *Broker) HasLogged(substr string) bool {
	b.t.Helper()
	return b.runLogged(b.current(), substr)
}

func (b *Broker) runLogged(r *run, substr string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, l := range b.lines[r.from:] {
		if strings.Contains(l, substr) {
			return true
		}
	}
	return false
}

// Logs is everything every run wrote to stdout and stderr.
func (b *Broker) Logs() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Join(b.lines, "\n")
}

func (b *Broker) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	lines := b.lines
	head := ""
	if len(lines) > n {
		head = fmt.Sprintf("(%d earlier lines left out)\n", len(lines)-n)
		lines = lines[len(lines)-n:]
	}
	return head + strings.Join(lines, "\n")
}

// Signal sends sig to the running process.
func (b *Broker) Signal(sig syscall.Signal) {
	b.t.Helper()
	if err := b.current().cmd.Process.Signal(sig); err != nil {
		b.t.Fatalf("%s: signal %v: %v", b.name, sig, err)
	}
}

// Wait waits for the current run to end and returns its exit error (nil
// for status 0, an *exec.ExitError otherwise); the test fails if it is
// still running after timeout.
func (b *Broker) Wait(timeout time.Duration) error {
	b.t.Helper()
	r := b.current()
	select {
	case <-r.exited:
		return r.err
	case <-time.After(timeout):
		b.t.Fatalf("%s did not exit within %v", b.name, timeout)
		return nil
	}
}

// Stop sends sig and waits for the process to end: Signal, then Wait.
func (b *Broker) Stop(sig syscall.Signal, timeout time.Duration) error {
	b.t.Helper()
	b.Signal(sig)
	return b.Wait(timeout)
}

// Kill is kill -9 and the reaping of the process; a no-op when nothing runs.
func (b *Broker) Kill() {
	b.mu.Lock()
	r := b.run
	b.mu.Unlock()
	if r == nil {
		return
	}
	select {
	case <-r.exited:
	default:
		_ = r.cmd.Process.Kill()
		<-r.exited
	}
}

// Run runs a subcommand of the binary with the broker's environment and
// returns its stdout; the test fails on a non-zero exit.
func (b *Broker) Run(args ...string) []byte {
	b.t.Helper()
	cmd := exec.Command(b.bin, args...)
	cmd.Env = b.env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		b.t.Fatalf("meshbroker %v: %v\n%s", args, err, stderr.String())
	}
	return out
}

// Port is the listening port: the bound one once a run logged its start
// line, Options.Port before, otherwise 0.
func (b *Broker) Port() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.port
}

// URL is the WebSocket URL.
func (b *Broker) URL() string { return fmt.Sprintf("ws://127.0.0.1:%d/ws", b.Port()) }

// HTTPURL is the URL of path on the broker.
func (b *Broker) HTTPURL(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", b.Port(), path)
}

// Dial connects a client (Cwd "/work/<display name>" unless set) and
// closes it when the test ends.
func (b *Broker) Dial(id client.Identity, opts client.Options) *client.Client {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
	defer cancel()
	if opts.Cwd == "" {
		opts.Cwd = "/work/" + id.DisplayName
	}
	c, err := client.Connect(ctx, b.URL(), id, opts)
	if err != nil {
		b.t.Fatalf("connect %s to %s: %v", id.DisplayName, b.name, err)
	}
	b.t.Cleanup(c.Kill)
	return c
}

// Memory reads the running process's current and peak resident set size
// (VmRSS and VmHWM, in bytes) from /proc.
func (b *Broker) Memory() (rss, peak int64) {
	b.t.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", b.current().cmd.Process.Pid))
	if err != nil {
		b.t.Fatalf("%s: read /proc status: %v", b.name, err)
	}
	rss, peak = -1, -1
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || (f[0] != "VmRSS:" && f[0] != "VmHWM:") {
			continue
		}
		kb, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			b.t.Fatalf("%s: /proc status line %q: %v", b.name, line, err)
		}
		if f[0] == "VmRSS:" {
			rss = kb << 10
		} else {
			peak = kb << 10
		}
	}
	if rss < 0 || peak < 0 {
		b.t.Fatalf("%s: no VmRSS or VmHWM in /proc status", b.name)
	}
	return rss, peak
}
