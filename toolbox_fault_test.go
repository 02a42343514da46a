package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// childBroker is the real binary run as a child process, for faults.
type childBroker struct {
	t    *testing.T
	bin  string
	env  []string
	port int
	cmd  *exec.Cmd
	logs *lockedBuffer
}

// newChildBroker prepares the binary, run from the test's own storage.
func newChildBroker(t *testing.T, storageEnv []string) *childBroker {
	port := freePort(t)
	env := append(os.Environ(), "BROKER_HOST=127.0.0.1", fmt.Sprintf("BROKER_PORT=%d", port), "LOG_LEVEL=info", "SEND_RATE_LIMIT_PER_MIN=0")
	c := &childBroker{t: t, bin: buildBroker(t), env: append(env, storageEnv...), port: port, logs: &lockedBuffer{}}
	t.Cleanup(func() {
		c.kill()
		if t.Failed() {
			t.Logf("broker logs:\n%s", c.logs.String())
		}
	})
	return c
}

// run runs a subcommand of the binary and returns its stdout.
func (c *childBroker) run(args ...string) []byte {
	c.t.Helper()
	cmd := exec.Command(c.bin, args...)
	cmd.Env = c.env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		c.t.Fatalf("meshbroker %v: %v\n%s", args, err, stderr.String())
	}
	return out
}

// start starts the broker and waits for /health.
func (c *childBroker) start() {
	c.t.Helper()
	c.cmd = exec.Command(c.bin)
	c.cmd.Env = c.env
	c.cmd.Stderr = c.logs
	if err := c.cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	waitFor(c.t, 30*time.Second, "the broker's /health", func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/health", c.port))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// kill is kill -9.
func (c *childBroker) kill() {
	if c.cmd == nil || c.cmd.Process == nil {
		return
	}
	_ = c.cmd.Process.Kill()
	_ = c.cmd.Wait()
	c.cmd = nil
}

func (c *childBroker) url() string { return fmt.Sprintf("ws://127.0.0.1:%d/ws", c.port) }

func (c *childBroker) connect(id client.Identity) *client.Client {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := client.Connect(ctx, c.url(), id, client.Options{Cwd: "/work/" + id.DisplayName})
	if err != nil {
		c.t.Fatalf("connect %s: %v", id.DisplayName, err)
	}
	c.t.Cleanup(func() { cl.Kill() })
	return cl
}

// Schedules due at one moment survive a kill -9 around that moment: after
// the restart each has fired exactly once and its message is queued once,
// and further kills and restarts fire nothing again.
func TestScheduleFiresOnceAcrossKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	dir := t.TempDir()
	storage := []string{"DATA_DIR=" + dir}
	var dbURL string
	if os.Getenv(modelstest.EnvDatabaseURL) != "" {
		dbURL = modelstest.FreshPostgresURL(t)
		storage = append(storage, "DATABASE_URL="+dbURL)
	}
	b := newChildBroker(t, storage)
	idFile := filepath.Join(dir, "ids.json")
	b.run("demo", "--out", idFile)
	ids := loadIdentities(t, idFile)
	alice, bob := ids[0], ids[1]

	b.start()
	a := b.connect(alice)
	const n = 30
	due := time.Now().Add(3 * time.Second) // room for the 30 requests on a slow machine
	want := map[string]bool{}
	for i := range n {
		msg := fmt.Sprintf("due together %02d", i)
		want[msg] = true
		call(t, a, map[string]any{"type": "schedule", "to": bob.Pubkey(), "message": msg, "deliverAt": due.UnixMilli()})
	}
	// Kill it just as they fall due: some, all or none may have fired.
	time.Sleep(time.Until(due) + 20*time.Millisecond)
	b.kill()

	db, err := models.Open(context.Background(), dbURL, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	count := func(q string, args ...any) int64 {
		t.Helper()
		var v int64
		if err := db.Raw(q, args...).Scan(&v).Error; err != nil {
			t.Fatal(err)
		}
		return v
	}
	firedOnce := func() bool {
		return count(`SELECT count(*) FROM `+db.Table("scheduled_message")+` WHERE member_id = ? AND fired_count = 1 AND fired_at IS NOT NULL`, alice.MemberID) == n
	}
	checkQueue := func() {
		t.Helper()
		if bad := count(`SELECT count(*) FROM `+db.Table("scheduled_message")+` WHERE member_id = ? AND fired_count > 1`, alice.MemberID); bad != 0 {
			t.Fatalf("%d schedules fired more than once", bad)
		}
		for msg := range want {
			c := base64.StdEncoding.EncodeToString([]byte(msg))
			if got := count(`SELECT count(*) FROM `+db.Table("message_queue")+` WHERE ciphertext = ?`, c); got != 1 {
				t.Fatalf("%q is queued %d times, want once", msg, got)
			}
		}
	}

	b.start()
	waitFor(t, 30*time.Second, "every schedule to fire once", firedOnce)
	checkQueue()

	bb := b.connect(bob)
	got := map[string]bool{}
	for len(got) < n {
		p, body := nextMessage(t, bb)
		if got[body] || !want[body] {
			t.Fatalf("unexpected or repeated message %q (%+v)", body, p)
		}
		got[body] = true
	}

	// A push counts as received once a pong confirms it, and that mark is
	// committed within DELIVERED_FLUSH_MS (M3); before then a crash would
	// rightly push it again. Wait for the marks, so that what the restarts
	// below may bring is only a second fire.
	waitFor(t, 30*time.Second, "every push confirmed durably", func() bool {
		for msg := range want {
			c := base64.StdEncoding.EncodeToString([]byte(msg))
			if count(`SELECT count(*) FROM `+db.Table("message_queue")+` WHERE ciphertext = ? AND delivered_at IS NOT NULL`, c) != 1 {
				return false
			}
		}
		return true
	})

	// More crashes fire nothing again.
	for range 2 {
		b.kill()
		b.start()
		bb = b.connect(bob)
		if extra := collect(bb, 500*time.Millisecond, isMessage); len(extra) != 0 {
			t.Fatalf("%d messages after a restart, want none", len(extra))
		}
	}
	checkQueue()
	if !firedOnce() {
		t.Fatal("a schedule's fire count moved after the restarts")
	}
}
