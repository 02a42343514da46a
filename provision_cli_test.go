package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models/modelstest"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// keygen, mesh list, member list, uppercase keys and re-adding a revoked
// key, through the same run() the binary uses.
func TestProvisioningListsKeygenAndReAdd(t *testing.T) {
	t.Parallel()
	env := map[string]string{"DATA_DIR": t.TempDir()}
	if os.Getenv(modelstest.EnvDatabaseURL) != "" {
		env["DATABASE_URL"] = modelstest.FreshPostgresURL(t)
	}
	runCmd := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(args, func(k string) string { return env[k] }, &out, &errb)
		return code, out.String(), errb.String()
	}

	// keygen: a working key pair, different each time, nothing stored.
	code, out, errs := runCmd("keygen")
	var kp struct{ Pubkey, SecretKey string }
	if code != 0 || json.Unmarshal([]byte(out), &kp) != nil {
		t.Fatalf("keygen: %d %s %s", code, out, errs)
	}
	secret, err := hex.DecodeString(kp.SecretKey)
	if err != nil || len(secret) != ed25519.PrivateKeySize || protocol.PubkeyHex(ed25519.PrivateKey(secret)) != kp.Pubkey {
		t.Fatalf("keygen pair does not match: %s", out)
	}
	if _, out2, _ := runCmd("keygen"); out2 == out {
		t.Fatal("keygen printed the same key twice")
	}
	if code, _, _ := runCmd("keygen", "extra"); code != 2 {
		t.Fatalf("keygen extra: %d", code)
	}

	code, out, _ = runCmd("mesh", "create", "ops team")
	var owner services.Identity
	if code != 0 || json.Unmarshal([]byte(out), &owner) != nil {
		t.Fatalf("mesh create: %d %s", code, out)
	}
	code, out, _ = runCmd("mesh", "list")
	var meshes []services.MeshSummary
	if code != 0 || json.Unmarshal([]byte(out), &meshes) != nil || len(meshes) != 1 || meshes[0].ID != owner.MeshID ||
		meshes[0].Name != "ops team" || meshes[0].Slug != "ops-team" || meshes[0].Members != 1 {
		t.Fatalf("mesh list: %d %s", code, out)
	}

	// An uppercase key is stored lower case, as hellos carry it.
	upper := strings.ToUpper(kp.Pubkey)
	code, out, errs = runCmd("member", "add", "--mesh", owner.MeshID, "--pubkey", upper, "--name", "dave")
	var dave services.Identity
	if code != 0 || json.Unmarshal([]byte(out), &dave) != nil || dave.Pubkey != kp.Pubkey {
		t.Fatalf("member add (upper case): %d %s %s", code, out, errs)
	}
	if code, _, errs := runCmd("member", "add", "--mesh", owner.MeshID, "--pubkey", kp.Pubkey, "--name", "dave2"); code != 2 || !strings.Contains(errs, "already a member") {
		t.Fatalf("active duplicate: %d %s", code, errs)
	}
	listMembers := func() []services.MemberSummary {
		t.Helper()
		code, out, errs := runCmd("member", "list", "--mesh", owner.MeshID)
		var ms []services.MemberSummary
		if code != 0 || json.Unmarshal([]byte(out), &ms) != nil {
			t.Fatalf("member list: %d %s %s", code, out, errs)
		}
		return ms
	}
	if ms := listMembers(); len(ms) != 2 || ms[0].ID != owner.MemberID || ms[0].Role != "admin" || ms[1].Pubkey != kp.Pubkey || ms[1].RevokedAt != nil {
		t.Fatalf("members: %+v", ms)
	}

	// Revoke by the uppercase key, then add it back: a new active row, the
	// revoked one kept.
	if code, out, errs := runCmd("member", "revoke", "--mesh", owner.MeshID, "--member", upper); code != 0 || !strings.Contains(out, `"revoked": "`+kp.Pubkey+`"`) {
		t.Fatalf("revoke (the answer names the key in lower case): %d %s %s", code, out, errs)
	}
	code, out, errs = runCmd("member", "add", "--mesh", owner.MeshID, "--pubkey", kp.Pubkey, "--name", "dave", "--role", "admin")
	var back services.Identity
	if code != 0 || json.Unmarshal([]byte(out), &back) != nil || back.MemberID == dave.MemberID {
		t.Fatalf("re-add revoked key: %d %s %s", code, out, errs)
	}
	ms := listMembers()
	if len(ms) != 3 || ms[1].ID != dave.MemberID || ms[1].RevokedAt == nil || ms[2].ID != back.MemberID || ms[2].RevokedAt != nil || ms[2].Role != "admin" {
		t.Fatalf("members after re-add: %+v", ms)
	}

	for _, bad := range [][]string{{"member", "list"}, {"member", "list", "--mesh", "nope"}, {"mesh", "list", "x"}} {
		if code, _, errs := runCmd(bad...); code == 0 || !strings.HasPrefix(errs, "meshbroker: ") {
			t.Errorf("%v: %d %q", bad, code, errs)
		}
	}

	// The re-added key connects with the keygen secret.
	b := startTestBroker(t, func(c *config.Config) { c.DataDir, c.DatabaseURL = env["DATA_DIR"], env["DATABASE_URL"] })
	id := client.Identity{MeshID: owner.MeshID, MemberID: back.MemberID, DisplayName: "dave", Key: ed25519.PrivateKey(secret)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Connect(ctx, b.url(), id, client.Options{Cwd: "/work/dave"})
	if err != nil {
		t.Fatalf("re-added member cannot connect: %v", err)
	}
	c.Close()
}
