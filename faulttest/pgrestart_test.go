package faulttest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/internal/brokerproc"
	"github.com/claudemesh/meshbroker/internal/faultload"
)

// privatePostgres is a Postgres cluster this test started in a temporary
// directory on its own port, so restarting it touches nobody else's
// database (never the machine's shared cluster).
type privatePostgres struct {
	pgCtl   string
	dir     string // owned by the postgres user when we run as root
	dataDir string
	port    int
	asUser  bool // commands run through runuser -u postgres
}

func (p *privatePostgres) URL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", p.port)
}

// findInitdb looks on PATH, then in the Debian layout.
func findInitdb() (initdb, pgCtl string, ok bool) {
	if path, err := exec.LookPath("initdb"); err == nil {
		if ctl, err := exec.LookPath("pg_ctl"); err == nil {
			return path, ctl, true
		}
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	for i := len(matches) - 1; i >= 0; i-- {
		ctl := filepath.Join(filepath.Dir(matches[i]), "pg_ctl")
		if _, err := os.Stat(ctl); err == nil {
			return matches[i], ctl, true
		}
	}
	return "", "", false
}

func (p *privatePostgres) run(t *testing.T, name string, args ...string) {
	t.Helper()
	if p.asUser {
		args = append([]string{"-u", "postgres", "--", name}, args...)
		name = "runuser"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 10 * time.Second // a postmaster that kept our pipe open must not hang the test
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// startPrivatePostgres initdbs a cluster and starts it; it is stopped and
// removed when the test ends. The test is skipped if initdb is absent.
func startPrivatePostgres(t *testing.T) *privatePostgres {
	t.Helper()
	initdb, pgCtl, ok := findInitdb()
	if !ok {
		t.Skip("initdb not found (PATH, /usr/lib/postgresql/*/bin): the Postgres restart scenario needs a private cluster")
	}
	dir, err := os.MkdirTemp("", "meshbroker-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := &privatePostgres{pgCtl: pgCtl, dir: dir, dataDir: filepath.Join(dir, "data")}
	if os.Geteuid() == 0 { // initdb refuses root: run the cluster as postgres
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Skip("running as root and no postgres user to run a private cluster as")
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
		p.asUser = true
	}
	p.port = brokerproc.FreePort(t) // pg_ctl needs it named up front
	p.run(t, initdb, "-D", p.dataDir, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
	// fsync off: this cluster tests the broker's handling of a restart, not
	// Postgres's durability, and the machine is busy.
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100", p.port, dir)
	p.run(t, pgCtl, "-D", p.dataDir, "-l", filepath.Join(dir, "log"), "-w", "-t", "120", "-o", opts, "start")
	t.Cleanup(func() {
		args := []string{"-D", p.dataDir, "-m", "immediate", "-w", "stop"}
		if p.asUser {
			args = append([]string{"-u", "postgres", "--", pgCtl}, args...)
			_ = exec.Command("runuser", args...).Run()
			return
		}
		_ = exec.Command(pgCtl, args...).Run()
	})
	return p
}

// restart stops the cluster (fast: open connections are cut) and starts it
// again with the same options.
func (p *privatePostgres) restart(t *testing.T) {
	t.Helper()
	p.run(t, p.pgCtl, "-D", p.dataDir, "-l", filepath.Join(p.dir, "log"), "-m", "fast", "-w", "-t", "120", "restart")
}

// A Postgres restart under load: the broker keeps its sockets, answers
// sends it could not store with the documented retryable error (never an
// ack), recovers by itself, and loses no acked message.
func TestPostgresRestartUnderLoad(t *testing.T) {
	pg := startPrivatePostgres(t)
	s := newScenario(t, brokerproc.Storage{DataDir: t.TempDir(), DatabaseURL: pg.URL()}, senders, receivers, baseEnv())
	b := s.start()
	load := faultload.NewLoad(b.URL(), s.mesh, ratePerSender, window)
	load.Reconnect = true
	rctx, stopReceivers := context.WithCancel(context.Background())
	defer func() { stopReceivers(); load.WaitReceivers() }()
	load.StartReceivers(rctx)
	waitUntil(t, time.Minute, "receivers connected", func() bool { return load.Connected() == receivers })
	sctx, stopSenders := context.WithCancel(context.Background())
	defer stopSenders()
	if err := load.StartSenders(sctx); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 2*time.Minute, "acked sends before the restart", func() bool { return load.Acked() >= ackedBeforeFault/2 })
	pg.restart(t)
	before := load.Acked()
	waitUntil(t, 2*time.Minute, "acked sends after the restart", func() bool { return load.Acked() >= before+ackedBeforeFault/2 })
	stopSenders()
	load.WaitSenders()
	if err := load.Settle(ctxFor(t, 2*time.Minute), s.db); err != nil {
		t.Errorf("after the Postgres restart: %v", err)
	}
	committed, err := faultload.Committed(ctxFor(t, time.Minute), s.db, s.mesh.ID)
	if err != nil {
		t.Fatal(err)
	}
	r := load.Report(committed)
	t.Logf("postgres restart: %s", r)
	if r.Lost != 0 {
		t.Errorf("%d acked messages lost", r.Lost)
	}
	for what, n := range r.SendErrors {
		if what != "internal: message not stored, retry" {
			t.Errorf("%d sends answered %q, want only the retryable \"message not stored, retry\"", n, what)
		}
	}
	if err := b.Stop(syscall.SIGTERM, time.Minute); err != nil {
		t.Errorf("SIGTERM after the restart: %v", err)
	}
}
