package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

func httpDo(t *testing.T, method, url, body string) (int, http.Header, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b)
}

// 03 §12 scenarios 1, 3 and issue 2's HTTP list.
func TestHTTPRoutes(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.GitSHA = "abc1234" })
	code, hdr, body := httpDo(t, "GET", b.httpURL("/health"), "")
	var h map[string]any
	_ = json.Unmarshal([]byte(body), &h)
	if code != 200 || h["status"] != "ok" || h["db"] != "up" || h["version"] != "0.1.0" || h["gitSha"] != "abc1234" || hdr.Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("/health %d %s %v", code, body, hdr)
	}
	if _, ok := h["uptime"].(float64); !ok || len(h) != 5 {
		t.Fatalf("/health keys %v", h)
	}
	if code, _, body := httpDo(t, "GET", b.httpURL("/health/ready"), ""); code != 200 || !strings.Contains(body, `"status":"ready"`) {
		t.Fatalf("/health/ready %d %s", code, body)
	}
	for _, p := range []string{"/health?x=1", "/nope", "/hook/set-status?x"} {
		method := "GET"
		if strings.HasPrefix(p, "/hook") {
			method = "POST"
		}
		code, hdr, body := httpDo(t, method, b.httpURL(p), "")
		if code != 404 || body != `{"error":"not found"}`+"\n" || !strings.HasPrefix(hdr.Get("Content-Type"), "application/json") {
			t.Fatalf("%s → %d %q %v", p, code, body, hdr)
		}
	}
	if code, _, _ := httpDo(t, "OPTIONS", b.httpURL("/whatever"), ""); code != 204 {
		t.Fatalf("OPTIONS %d", code)
	}
	if code, _, _ := httpDo(t, "HEAD", b.httpURL("/health"), ""); code == 200 {
		t.Fatal("HEAD /health served")
	}
	big := `{"cwd":"` + strings.Repeat("x", b.cfg.MaxMessageBytes) + `","status":"idle"}`
	if code, _, body := httpDo(t, "POST", b.httpURL("/hook/set-status"), big); code != 413 || body != `{"ok":false,"error":"payload too large"}`+"\n" {
		t.Fatalf("oversized body %d %s", code, body)
	}
}

// 03 §12 scenario 4: every reference metric is exposed after a short
// scripted session, plus ours.
func TestMetrics(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	if ack, err := a.Send(ctxT(t), client.SendRequest{TargetSpec: f.b.Pubkey(), Priority: "now", Nonce: "", Ciphertext: "x"}); err != nil || !ack.Queued {
		t.Fatal(ack, err)
	}
	waitFrame(t, bob, 10*time.Second, isMessage)
	postHook(t, b, `{"cwd":"/nowhere","status":"idle"}`)
	code, hdr, body := httpDo(t, "GET", b.httpURL("/metrics"), "")
	if code != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "text/plain; version=0.0.4") || !strings.HasSuffix(body, "\n") {
		t.Fatalf("/metrics %d %v", code, hdr)
	}
	for _, name := range []string{
		"broker_connections_total", "broker_connections_rejected_total", "broker_connections_active", "broker_messages_routed_total",
		"broker_messages_rejected_total", "broker_messages_dropped_by_grant_total", "broker_legacy_auth_hits_total", "broker_queue_depth",
		"broker_ttl_sweeps_total", "broker_hook_requests_total", "broker_hook_requests_rate_limited_total", "broker_db_healthy",
		"meshbroker_offline_leases", "meshbroker_reattaches_total", "meshbroker_evictions_total", "meshbroker_queue_claim_age_seconds",
		"meshbroker_audit_pending", "meshbroker_audit_failed_total", "go_goroutines", "process_resident_memory_bytes",
	} {
		if !strings.Contains(body, "# TYPE "+name+" ") {
			t.Errorf("/metrics lacks %s", name)
		}
	}
	sample := regexp.MustCompile(`(?m)^broker_messages_routed_total\{priority="now"\} 1$`)
	if !sample.MatchString(body) {
		t.Errorf("routed counter not 1:\n%s", grepLines(body, "broker_messages_routed"))
	}
	if !strings.Contains(body, "broker_hook_requests_total 1\n") || !strings.Contains(body, "broker_connections_active 2\n") {
		t.Errorf("counters:\n%s", grepLines(body, "broker_hook_requests_total|broker_connections_active"))
	}
}

func grepLines(body, pattern string) string {
	re := regexp.MustCompile(pattern)
	var out []string
	for _, l := range strings.Split(body, "\n") {
		if re.MatchString(l) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// /health/ready flips to 503 while the database is unreachable and back to
// 200 when it returns; /health stays 200 with db down. Postgres only: an
// embedded SQLite file cannot go away under a running process.
func TestReadinessFollowsDatabase(t *testing.T) {
	t.Parallel()
	if os.Getenv(modelstest.EnvDatabaseURL) == "" {
		t.Skip("needs TEST_DATABASE_URL: the embedded database cannot become unreachable")
	}
	b := startTestBroker(t, func(c *config.Config) { c.DBHealthInterval = 30 * time.Millisecond })
	var dbName string
	b.query(&dbName, "SELECT current_database()")
	admin := modelstest.Open(t, os.Getenv(modelstest.EnvDatabaseURL))
	block := func(on bool) {
		if err := admin.Exec(fmt.Sprintf(`ALTER DATABASE %q ALLOW_CONNECTIONS %t`, dbName, !on)).Error; err != nil {
			t.Fatal(err)
		}
		if on {
			admin.Exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ? AND pid <> pg_backend_pid()", dbName)
		}
	}
	block(true)
	t.Cleanup(func() { block(false) })
	waitFor(t, 10*time.Second, "ready 503", func() bool {
		code, _, body := httpDo(t, "GET", b.httpURL("/health/ready"), "")
		return code == 503 && strings.Contains(body, `"reason":"db_down"`)
	})
	if code, _, body := httpDo(t, "GET", b.httpURL("/health"), ""); code != 200 || !strings.Contains(body, `"db":"down"`) {
		t.Fatalf("/health while down: %d %s", code, body)
	}
	block(false)
	waitFor(t, 10*time.Second, "ready 200", func() bool {
		code, _, _ := httpDo(t, "GET", b.httpURL("/health/ready"), "")
		return code == 200
	})
}

// Provisioning commands, including bad input that changes nothing.
func TestProvisioningCommands(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	env := map[string]string{"DATA_DIR": dir}
	if u := os.Getenv(modelstest.EnvDatabaseURL); u != "" {
		env["DATABASE_URL"] = modelstest.FreshPostgresURL(t)
	}
	getenv := func(k string) string { return env[k] }
	runCmd := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(args, getenv, &out, &errb)
		return code, out.String(), errb.String()
	}
	code, out, _ := runCmd("mesh", "create", "team")
	var owner struct{ MeshID, MemberID, Pubkey, SecretKey, Role string }
	if code != 0 || json.Unmarshal([]byte(out), &owner) != nil || len(owner.MeshID) != 32 || len(owner.SecretKey) != 128 || owner.Role != "admin" {
		t.Fatalf("mesh create: %d %s", code, out)
	}
	pk := strings.Repeat("ab", 32)
	if code, out, errs := runCmd("member", "add", "--mesh", owner.MeshID, "--pubkey", pk, "--name", "bob"); code != 0 || !strings.Contains(out, pk) {
		t.Fatalf("member add: %d %s %s", code, out, errs)
	}
	for _, bad := range [][]string{
		{"member", "add", "--mesh", owner.MeshID, "--pubkey", pk, "--name", "bob"},               // duplicate
		{"member", "add", "--mesh", owner.MeshID, "--pubkey", "XYZ", "--name", "eve"},            // bad key
		{"member", "add", "--mesh", "nope", "--pubkey", strings.Repeat("cd", 32), "--name", "x"}, // no mesh
		{"member", "add", "--mesh", owner.MeshID, "--pubkey", strings.Repeat("cd", 32), "--name", "x", "--role", "god"},
		{"member", "add", "--mesh", owner.MeshID},
		{"member", "revoke", "--mesh", owner.MeshID, "--member", "ghost"},
		{"mesh", "create"},
		{"frobnicate"},
	} {
		if code, _, errs := runCmd(bad...); code == 0 || !strings.HasPrefix(errs, "meshbroker: ") {
			t.Errorf("%v accepted (%d) or unclear error %q", bad, code, errs)
		}
	}
	if code, _, _ := runCmd("member", "revoke", "--mesh", owner.MeshID, "--member", pk); code != 0 {
		t.Fatal("revoke failed")
	}
	outFile := dir + "/ids.json"
	if code, out, errs := runCmd("demo", "--out", outFile); code != 0 || !strings.Contains(out, outFile) {
		t.Fatalf("demo: %d %s %s", code, out, errs)
	}
	var ids []struct{ MeshID, MemberID, Pubkey, SecretKey, DisplayName string }
	raw, _ := os.ReadFile(outFile)
	if json.Unmarshal(raw, &ids) != nil || len(ids) != 2 || ids[0].MeshID != ids[1].MeshID || len(ids[1].SecretKey) != 128 {
		t.Fatalf("demo identities: %s", raw)
	}
	if code, out, _ := runCmd("--help"); code != 0 || !strings.Contains(out, "LEASE_TTL_MS") || !strings.Contains(out, "mesh create") {
		t.Fatalf("--help: %s", out)
	}
	env["BROKER_PORT"] = "-1"
	if code, _, errs := runCmd(); code != 1 || !strings.Contains(errs, "BROKER_PORT") {
		t.Fatalf("bad config: %d %s", code, errs)
	}
}

// The demo identities connect to a broker on the same storage, as a user
// following the README would.
func TestDemoIdentitiesConnect(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	var out bytes.Buffer
	env := map[string]string{"DATA_DIR": b.cfg.DataDir, "DATABASE_URL": b.cfg.DatabaseURL}
	file := t.TempDir() + "/ids.json"
	if code := run([]string{"demo", "--out", file}, func(k string) string { return env[k] }, &out, io.Discard); code != 0 {
		t.Fatalf("demo: %d", code)
	}
	ids := loadIdentities(t, file)
	alice := b.connect(ids[0], client.Options{})
	bob := b.connect(ids[1], client.Options{})
	if ack, err := alice.SendSealed(context.Background(), ids[1].Pubkey(), pub(ids[1].Key), "now", []byte("hi bob")); err != nil || !ack.Queued {
		t.Fatal(ack, err)
	}
	p := decodePush(t, waitFrame(t, bob, 10*time.Second, isMessage))
	if body, err := client.Open(p.Nonce, p.Ciphertext, pub(ids[0].Key), ids[1].Key); err != nil || string(body) != "hi bob" {
		t.Fatalf("%q %v", body, err)
	}
}

func loadIdentities(t *testing.T, file string) []client.Identity {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := client.ParseIdentities(raw)
	if err != nil {
		t.Fatal(err)
	}
	return ids
}
