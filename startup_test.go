package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// A start that cannot bind its port fails before it touches the leases: the
// previous process stopped cleanly, and the start after the failed one must
// still see a clean stop, not adopt "crashed" leases.
func TestFailedListenLeavesCleanStop(t *testing.T) {
	t.Parallel()
	first := startTestBroker(t)
	cfg := first.cfg
	first.stop()

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	failed := cfg
	failed.Port = taken.Addr().(*net.TCPAddr).Port
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	logs := &lockedBuffer{}
	if b, err := startBrokerWithClock(ctx, failed, newLogger(logs, config.Default().LogLevel), time.Now); err == nil {
		b.Close(ctx)
		t.Fatal("a broker started on a port that is taken")
	} else if !strings.Contains(err.Error(), "listen on") {
		t.Fatalf("start on a taken port: %v", err)
	}

	again := cfg
	again.Port = 0
	b, err := startBrokerWithClock(ctx, again, newLogger(logs, config.Default().LogLevel), time.Now)
	if err != nil {
		t.Fatalf("start after the failed one: %v", err)
	}
	if err := b.Close(ctx); err != nil {
		t.Errorf("close: %v", err)
	}
	if strings.Contains(logs.String(), "did not stop cleanly") {
		t.Fatalf("the start after a failed listen took the previous stop for a crash:\n%s", logs.String())
	}
}

// An EXPECTED_MIGRATION this database has not recorded is named at start,
// with the versions it has, and /health/ready's 503 lists them too.
func TestUnknownExpectedMigrationNamesRecordedVersions(t *testing.T) {
	t.Parallel()
	b, logs := startLoggedBroker(t, "info", func(c *config.Config) { c.ExpectedSchema = "0002_bogus" })
	warned := logs.logLines(t, "EXPECTED_MIGRATION is not recorded in this database; /health/ready answers 503 until it is")
	if len(warned) != 1 || warned[0]["expected"] != "0002_bogus" || fmt.Sprint(warned[0]["recorded"]) != "["+models.SchemaVersion+"]" {
		t.Fatalf("start warning: %v\n%s", warned, logs.String())
	}
	code, _, body := httpDo(t, "GET", b.httpURL("/health/ready"), "")
	var ready map[string]string
	if err := json.Unmarshal([]byte(body), &ready); err != nil || code != 503 || ready["reason"] != "migration_missing" ||
		!strings.Contains(ready["error"], "recorded: "+models.SchemaVersion) {
		t.Fatalf("/health/ready: %d %s", code, body)
	}

	// The version this build records is not warned about.
	_, logs = startLoggedBroker(t, "info", func(c *config.Config) { c.ExpectedSchema = models.SchemaVersion })
	if strings.Contains(logs.String(), "EXPECTED_MIGRATION") {
		t.Fatalf("warned about the recorded version:\n%s", logs.String())
	}
}

// On Postgres the start line names the database's host and name, never its
// user or password.
func TestStartLineNamesPostgresWithoutCredentials(t *testing.T) {
	t.Parallel()
	if os.Getenv(modelstest.EnvDatabaseURL) == "" {
		t.Skip("Postgres only: set TEST_DATABASE_URL")
	}
	b, logs := startLoggedBroker(t, "info")
	u, err := url.Parse(b.cfg.DatabaseURL)
	if err != nil {
		t.Fatal(err)
	}
	lines := logs.logLines(t, "broker listening")
	if len(lines) != 1 || lines[0]["db_host"] != u.Host || lines[0]["db_name"] != strings.TrimPrefix(u.Path, "/") {
		t.Fatalf("start line: %v", lines)
	}
	if u.User != nil && strings.Contains(logs.String(), "\""+u.User.Username()+"@") {
		t.Fatalf("start line carries the user: %s", logs.String())
	}
	for _, k := range []string{"clean_close_lease_ms", "claim_lease_ms", "hook_pending_max", "db_start_timeout_ms", "toolbox_max_memories"} {
		if _, ok := lines[0][k]; !ok {
			t.Errorf("start line lacks %s", k)
		}
	}
}
