package brokerproc

import (
	"errors"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) { os.Exit(Main(m.Run)) }

// The start line's port is what the kernel picked, a restart binds it
// again, SIGKILL and SIGTERM end the process with their exit statuses, and
// the log and /proc readings are the process's own.
func TestBrokerLifecycle(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the broker binary")
	}
	st := NewStorage(t)
	b := New(t, Options{Name: "lifecycle", Storage: st})
	b.Start()
	port := b.Port()
	if port == 0 {
		t.Fatal("no port read from the start line")
	}
	if rss, peak := b.Memory(); rss <= 0 || peak < rss {
		t.Fatalf("RSS %d, peak %d", rss, peak)
	}
	err := b.Stop(syscall.SIGKILL, time.Minute)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("after SIGKILL: %v", err)
	}

	b.Start()
	if b.Port() != port {
		t.Fatalf("restarted on port %d, want %d", b.Port(), port)
	}
	b.WaitLog("broker listening", time.Second)
	if !b.HasLogged("broker listening") || b.HasLogged("shutdown complete") {
		t.Fatal("the log of the current run")
	}
	resp, err := http.Get(b.HTTPURL("/health/ready"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/health/ready %d", resp.StatusCode)
	}
	if err := b.Stop(syscall.SIGTERM, time.Minute); err != nil {
		t.Fatalf("after SIGTERM: %v", err)
	}
	if !b.HasLogged("shutdown complete") {
		t.Fatalf("no shutdown line:\n%s", b.Logs())
	}
	b.Kill() // a no-op once it exited
}

// A second Broker pinned to a port that is taken retries until it is free.
func TestStartRetriesATakenPort(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the broker binary")
	}
	first := New(t, Options{Name: "first", Storage: SQLiteStorage(t)})
	first.Start()
	second := New(t, Options{Name: "second", Storage: SQLiteStorage(t), Port: first.Port()})
	done := make(chan struct{})
	defer close(done)
	go func() { // the first goes once the second was refused the port
		for !strings.Contains(second.Logs(), "address already in use") {
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
		first.Kill()
	}()
	second.Start()
	if second.Port() != first.Port() {
		t.Fatalf("second on %d, want %d", second.Port(), first.Port())
	}
}

func TestStartLine(t *testing.T) {
	for line, want := range map[string]int{
		`{"ts":"x","level":"info","msg":"broker listening","db":"sqlite","port":41234}`: 41234,
		`{"msg":"broker listening"}`:                     0,
		`{"msg":"not broker listening","port":5}`:        0,
		`broker listening on 5`:                          0,
		`{"msg":"start","err":"\"broker listening\" 7"}`: 0,
	} {
		if got, ok := startLine(line); got != want || ok != (want != 0) {
			t.Errorf("%s: %d %v, want %d", line, got, ok, want)
		}
	}
	if v := lookup([]string{"A=1", "LOG_LEVEL=info", "LOG_LEVEL=warn"}, "LOG_LEVEL"); v != "warn" {
		t.Errorf("lookup: %q, want the last entry", v)
	}
}
