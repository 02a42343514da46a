package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/nacl/box"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// End-to-end tests of invites (issue 14): `meshbroker invite create|list|
// revoke` on the broker's own storage, POST /join (v1) and POST
// /invites/:code/claim (v2) over real HTTP, the first hello of the new
// identity over a real socket, every refusal, and the race for an
// invite's last use.

// cli runs a provisioning subcommand on the broker's storage and returns
// its stdout, failing the test on a non-zero exit.
func (b *testBroker) cli(args ...string) string {
	b.t.Helper()
	code, out, errs := b.cliRun(args...)
	if code != 0 {
		b.t.Fatalf("meshbroker %v: exit %d: %s", args, code, errs)
	}
	return out
}

func (b *testBroker) cliRun(args ...string) (int, string, string) {
	env := map[string]string{"DATA_DIR": b.cfg.DataDir, "DATABASE_URL": b.cfg.DatabaseURL, "BROKER_PORT": strconv.Itoa(b.Port()), "LOG_LEVEL": "warn"}
	var out, errb bytes.Buffer
	code := run(args, func(k string) string { return env[k] }, &out, &errb)
	return code, out.String(), errb.String()
}

type issued struct {
	ID, Link, Code, ExpiresAt, Role string
	MaxUses                         int
}

func (b *testBroker) invite(meshID string, extra ...string) issued {
	b.t.Helper()
	var inv issued
	out := b.cli(append([]string{"invite", "create", "--mesh", meshID}, extra...)...)
	if err := json.Unmarshal([]byte(out), &inv); err != nil || !strings.HasPrefix(inv.Link, "ic://join/") || len(inv.Code) != 12 || inv.ExpiresAt == "" {
		b.t.Fatalf("invite create printed %s (%v)", out, err)
	}
	return inv
}

// postJSON posts body (a string is sent as is) and decodes the JSON reply.
func postJSON(t *testing.T, method, url string, body any, header http.Header) (int, map[string]any) {
	t.Helper()
	var raw []byte
	if s, ok := body.(string); ok {
		raw = []byte(s)
	} else {
		raw, _ = json.Marshal(body)
	}
	req, err := http.NewRequest(method, url, bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if err := json.Unmarshal(data, &out); err != nil {
		t.Fatalf("%s %s: %d, body is not JSON: %q", method, url, resp.StatusCode, data)
	}
	return resp.StatusCode, out
}

// linkPayload decodes a v1 link into its token and payload object.
func linkPayload(t *testing.T, link string) (string, map[string]any) {
	t.Helper()
	token := strings.TrimPrefix(link, "ic://join/")
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		t.Fatal(err)
	}
	var p map[string]any
	if err := json.Unmarshal(raw, &p); err != nil {
		t.Fatal(err)
	}
	return token, p
}

func (b *testBroker) joinV1(link string, key ed25519.PrivateKey, name string) (int, map[string]any) {
	token, payload := linkPayload(b.t, link)
	return postJSON(b.t, "POST", b.httpURL("/join"), map[string]any{
		"invite_token": token, "invite_payload": payload, "peer_pubkey": protocol.PubkeyHex(key), "display_name": name,
	}, nil)
}

func x25519Key(t *testing.T) (pub, priv *[32]byte) {
	t.Helper()
	pub, priv, err := box.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub, priv
}

func (b *testBroker) claimV2(code string, pub *[32]byte) (int, map[string]any) {
	return postJSON(b.t, "POST", b.httpURL("/invites/"+code+"/claim"), map[string]any{"recipient_x25519_pubkey": base64.RawURLEncoding.EncodeToString(pub[:])}, nil)
}

// counts is what a refused redemption must leave as it found.
type counts struct{ members, used int64 }

func (b *testBroker) counts(meshID string) counts {
	b.t.Helper()
	var c counts
	b.query(&c.members, "SELECT count(*) FROM {member} WHERE mesh_id = ?", meshID)
	if err := b.db.Raw("SELECT coalesce(sum(used_count), 0) FROM "+b.db.Table("invite")+" WHERE mesh_id = ?", meshID).Scan(&c.used).Error; err != nil {
		b.t.Fatal(err)
	}
	return c
}

func newMeshFromCLI(t *testing.T, b *testBroker) services.Identity {
	t.Helper()
	var owner services.Identity
	if err := json.Unmarshal([]byte(b.cli("mesh", "create", "Invite Test")), &owner); err != nil {
		t.Fatal(err)
	}
	if owner.Slug != "invite-test" || owner.RootKey == "" {
		t.Fatalf("mesh create lacks slug or root key: %+v", owner)
	}
	return owner
}

// The whole v1 path: mesh create, invite create, POST /join with a fresh
// key, a hello as the new member, a repeat that spends nothing, list and
// revoke.
func TestInviteV1JoinThenHello(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	owner := newMeshFromCLI(t, b)
	inv := b.invite(owner.MeshID, "--max-uses", "2", "--expires", "1h", "--broker-url", b.url())
	_, payload := linkPayload(t, inv.Link)
	var mesh struct{ OwnerPubkey, RootKey, Slug string }
	b.query(&mesh, "SELECT owner_pubkey, root_key, slug FROM "+b.db.Table("mesh")+" WHERE id = ?", owner.MeshID)
	if payload["mesh_id"] != owner.MeshID || payload["mesh_slug"] != mesh.Slug || payload["broker_url"] != b.url() || payload["role"] != "member" ||
		payload["owner_pubkey"] != mesh.OwnerPubkey || payload["mesh_root_key"] != mesh.RootKey || mesh.OwnerPubkey == owner.Pubkey {
		t.Fatalf("payload %v does not carry the mesh %+v (or signs with the owner member's key)", payload, mesh)
	}
	// The link verifies exactly as the CLI's parser checks it.
	p := protocol.InvitePayload{V: 1, MeshID: owner.MeshID, MeshSlug: mesh.Slug, BrokerURL: b.url(), ExpiresAt: payload["expires_at"].(float64),
		MeshRootKey: mesh.RootKey, Role: "member", OwnerPubkey: mesh.OwnerPubkey}
	canonical := fmt.Sprintf("1|%s|%s|%s|%d|%s|member|%s", owner.MeshID, mesh.Slug, b.url(), int64(p.ExpiresAt), mesh.RootKey, mesh.OwnerPubkey)
	if protocol.InviteV1SigningString(p) != canonical {
		t.Fatalf("canonical %q, want %q", protocol.InviteV1SigningString(p), canonical)
	}
	if ok, _ := protocol.Verify(mesh.OwnerPubkey, canonical, payload["signature"].(string)); !ok {
		t.Fatal("link signature does not verify")
	}
	before := b.counts(owner.MeshID)
	_, key, _ := ed25519.GenerateKey(nil)
	code, reply := b.joinV1(inv.Link, key, "laptop-1234")
	if code != 200 || reply["ok"] != true || reply["memberId"] == nil || reply["alreadyMember"] != nil {
		t.Fatalf("join: %d %v", code, reply)
	}
	memberID := reply["memberId"].(string)
	if after := b.counts(owner.MeshID); after.members != before.members+1 || after.used != before.used+1 {
		t.Fatalf("join changed counts %+v -> %+v", before, after)
	}
	var role string
	b.query(&role, "SELECT role FROM {member} WHERE id = ?", memberID)
	if role != "member" {
		t.Fatalf("role %q", role)
	}
	// The new identity says hello and talks.
	joined := b.connect(client.Identity{MeshID: owner.MeshID, MemberID: memberID, DisplayName: "laptop", Key: key}, client.Options{})
	peers, err := joined.ListPeers(ctxT(t))
	if err != nil || len(peers) != 1 || peers[0].MemberPubkey != protocol.PubkeyHex(key) {
		t.Fatalf("peers after join: %v %v", peers, err)
	}
	// Repeat: same key, same invite: the same member, nothing spent.
	code, reply = b.joinV1(inv.Link, key, "laptop-5678")
	if code != 200 || reply["memberId"] != memberID || reply["alreadyMember"] != true {
		t.Fatalf("repeat join: %d %v", code, reply)
	}
	if after := b.counts(owner.MeshID); after.members != before.members+1 || after.used != before.used+1 {
		t.Fatalf("repeat changed counts: %+v", after)
	}
	// The subscription to #general came with the join.
	var n int64
	b.query(&n, "SELECT count(*) FROM {topic_member} tm JOIN {topic} t ON t.id = tm.topic_id WHERE t.mesh_id = ? AND t.name = 'general' AND tm.member_id = ?", owner.MeshID, memberID)
	if n != 1 {
		t.Fatalf("joined member not in #general (%d)", n)
	}
	var list []services.InviteInfo
	if err := json.Unmarshal([]byte(b.cli("invite", "list", "--mesh", owner.MeshID)), &list); err != nil || len(list) != 1 || list[0].UsedCount != 1 || list[0].MaxUses != 2 || list[0].RevokedAt != nil {
		t.Fatalf("invite list: %+v %v", list, err)
	}
	b.cli("invite", "revoke", "--mesh", owner.MeshID, "--invite", inv.Code)
	if code, _, errs := b.cliRun("invite", "revoke", "--mesh", owner.MeshID, "--invite", inv.Code); code == 0 || !strings.Contains(errs, "no unrevoked invite") {
		t.Fatalf("second revoke: %d %s", code, errs)
	}
	_, other, _ := ed25519.GenerateKey(nil)
	if code, reply := b.joinV1(inv.Link, other, "late"); code != 410 || reply["error"] != "invite_revoked" || reply["ok"] != false {
		t.Fatalf("join on revoked invite: %d %v", code, reply)
	}
	for _, bad := range [][]string{
		{"invite", "create"},
		{"invite", "create", "--mesh", "nope"},
		{"invite", "create", "--mesh", owner.MeshID, "--role", "god"},
		{"invite", "create", "--mesh", owner.MeshID, "--max-uses", "0"},
		{"invite", "create", "--mesh", owner.MeshID, "--expires", "soon"},
		{"invite", "create", "--mesh", owner.MeshID, "--broker-url", "http://x/ws"},
		{"invite", "revoke", "--mesh", owner.MeshID},
	} {
		if code, _, errs := b.cliRun(bad...); code == 0 || !strings.HasPrefix(errs, "meshbroker: ") {
			t.Errorf("%v accepted (%d) or unclear error %q", bad, code, errs)
		}
	}
}

// Every bad v1 input is a 4xx with a JSON error and creates nothing.
func TestInviteV1Refusals(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	owner := newMeshFromCLI(t, b)
	inv := b.invite(owner.MeshID, "--broker-url", b.url())
	token, payload := linkPayload(t, inv.Link)
	_, key, _ := ed25519.GenerateKey(nil)
	pk := protocol.PubkeyHex(key)
	body := func(mut func(m map[string]any)) map[string]any {
		p := map[string]any{}
		for k, v := range payload {
			p[k] = v
		}
		m := map[string]any{"invite_token": token, "invite_payload": p, "peer_pubkey": pk, "display_name": "eve"}
		mut(m)
		return m
	}
	// A forged link: the payload changed and re-encoded, so token and
	// payload agree but the owner's signature does not cover them.
	forgedPayload := map[string]any{}
	for k, v := range payload {
		forgedPayload[k] = v
	}
	forgedPayload["role"] = "admin"
	forgedRaw, _ := json.Marshal(forgedPayload)
	forgedToken := base64.RawURLEncoding.EncodeToString(forgedRaw)
	// Revoked key: a banned member cannot come back through an invite.
	_, banned, _ := ed25519.GenerateKey(nil)
	prov := services.NewProvisionService(b.db, time.Now)
	if _, err := prov.AddMember(context.Background(), owner.MeshID, protocol.PubkeyHex(banned), "banned", "member"); err != nil {
		t.Fatal(err)
	}
	if _, err := prov.RevokeMember(context.Background(), owner.MeshID, protocol.PubkeyHex(banned)); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		body   any
		status int
		err    string
	}{
		{"not JSON", "{nope", 400, "body must be a JSON object"},
		{"missing fields", map[string]any{"invite_token": token}, 400, "invite_token, invite_payload, peer_pubkey, display_name required"},
		{"payload not an object", body(func(m map[string]any) { m["invite_payload"] = "x" }), 400, "invite_token, invite_payload, peer_pubkey, display_name required"},
		{"bad pubkey", body(func(m map[string]any) { m["peer_pubkey"] = "XYZ" }), 400, "peer_pubkey must be 64 lowercase hex chars (32 bytes)"},
		{"long name", body(func(m map[string]any) { m["display_name"] = strings.Repeat("n", 200) }), 400, "display_name must be at most 128 characters of text"},
		{"token not base64url", body(func(m map[string]any) { m["invite_token"] = "%%%" }), 400, "invite_token must be base64url"},
		{"payload disagrees with token", body(func(m map[string]any) { m["invite_payload"].(map[string]any)["role"] = "admin" }), 400, "invite_payload_mismatch"},
		{"forged signature", body(func(m map[string]any) { m["invite_token"], m["invite_payload"] = forgedToken, forgedPayload }), 400, "invite_bad_signature"},
		{"unknown invite", body(func(m map[string]any) {
			// Correctly signed by the owner key, but never stored.
			var sk string
			b.query(&sk, "SELECT owner_secret_key FROM "+b.db.Table("mesh")+" WHERE id = ?", owner.MeshID)
			skb, _ := hex.DecodeString(sk)
			p := m["invite_payload"].(map[string]any)
			p["expires_at"] = p["expires_at"].(float64) + 60
			ip := protocol.InvitePayload{V: 1, MeshID: p["mesh_id"].(string), MeshSlug: p["mesh_slug"].(string), BrokerURL: p["broker_url"].(string),
				ExpiresAt: p["expires_at"].(float64), MeshRootKey: p["mesh_root_key"].(string), Role: "member", OwnerPubkey: p["owner_pubkey"].(string)}
			ip.Signature, ip.InviteID = protocol.Sign(ed25519.PrivateKey(skb), protocol.InviteV1SigningString(ip)), "another"
			p["signature"], p["invite_id"] = ip.Signature, ip.InviteID
			raw, _ := json.Marshal(ip)
			m["invite_token"] = base64.RawURLEncoding.EncodeToString(raw)
		}), 404, "invite_not_found"},
		{"banned key", body(func(m map[string]any) { m["peer_pubkey"] = protocol.PubkeyHex(banned) }), 403, "pubkey_revoked"},
		{"oversized", `{"invite_token":"` + strings.Repeat("a", b.cfg.MaxMessageBytes) + `"}`, 413, "payload too large"},
	}
	before := b.counts(owner.MeshID)
	for _, c := range cases {
		status, reply := postJSON(t, "POST", b.httpURL("/join"), c.body, nil)
		if status != c.status || reply["ok"] != false || reply["error"] != c.err {
			t.Errorf("%s: %d %v, want %d %q", c.name, status, reply, c.status, c.err)
		}
	}
	// The stored invite disagreeing with its signed payload (a row changed
	// behind the signature) is refused too.
	b.db.Exec("UPDATE "+b.db.Table("invite")+" SET role = 'admin' WHERE id = ?", inv.ID)
	if status, reply := postJSON(t, "POST", b.httpURL("/join"), body(func(map[string]any) {}), nil); status != 400 || reply["error"] != "invite_payload_mismatch" {
		t.Errorf("row disagreeing with payload: %d %v", status, reply)
	}
	b.db.Exec("UPDATE "+b.db.Table("invite")+" SET role = 'member' WHERE id = ?", inv.ID)
	if after := b.counts(owner.MeshID); after != before {
		t.Fatalf("refusals changed counts %+v -> %+v", before, after)
	}
	// Expired: the broker's clock passes the expiry.
	short := b.invite(owner.MeshID, "--expires", "2s", "--broker-url", b.url())
	b.advance(5 * time.Second)
	if status, reply := b.joinV1(short.Link, key, "eve"); status != 410 || reply["error"] != "invite_expired" {
		t.Errorf("expired: %d %v", status, reply)
	}
	// Exhausted: the one use went to someone else.
	one := b.invite(owner.MeshID, "--broker-url", b.url())
	_, first, _ := ed25519.GenerateKey(nil)
	if status, reply := b.joinV1(one.Link, first, "first"); status != 200 {
		t.Fatalf("first use: %d %v", status, reply)
	}
	if status, reply := b.joinV1(one.Link, key, "eve"); status != 410 || reply["error"] != "invite_exhausted" {
		t.Errorf("exhausted: %d %v", status, reply)
	}
	// The one who spent the last use can still repeat its join.
	if status, reply := b.joinV1(one.Link, first, "first-again"); status != 200 || reply["alreadyMember"] != true {
		t.Errorf("repeat on a used-up invite: %d %v", status, reply)
	}
	if after := b.counts(owner.MeshID); after.members != before.members+1 || after.used != before.used+1 {
		t.Fatalf("only the first use may create: %+v -> %+v", before, after)
	}
}

// v2: the claim seals the root key to the claimant's x25519 key, the
// member waits unbound (and unlisted) until its first signed hello binds
// an ed25519 key, and every bad claim is a clear 4xx.
func TestInviteV2ClaimBindsOnFirstHello(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	owner := newMeshFromCLI(t, b)
	inv := b.invite(owner.MeshID, "--max-uses", "3", "--role", "admin", "--broker-url", b.url())
	pub, priv := x25519Key(t)
	before := b.counts(owner.MeshID)
	status, reply := b.claimV2(inv.Code, pub)
	if status != 200 {
		t.Fatalf("claim: %d %v", status, reply)
	}
	var mesh struct{ OwnerPubkey, RootKey string }
	b.query(&mesh, "SELECT owner_pubkey, root_key FROM "+b.db.Table("mesh")+" WHERE id = ?", owner.MeshID)
	sealed, err := base64.RawURLEncoding.DecodeString(reply["sealed_root_key"].(string))
	if err != nil {
		t.Fatal(err)
	}
	root, ok := box.OpenAnonymous(nil, sealed, pub, priv)
	if !ok || base64.RawURLEncoding.EncodeToString(root) != mesh.RootKey {
		t.Fatalf("sealed root key does not open to the mesh root key (%v)", ok)
	}
	memberID := reply["member_id"].(string)
	canonical := "v=2|" + owner.MeshID + "|" + inv.ID + "|"
	if reply["mesh_id"] != owner.MeshID || reply["owner_pubkey"] != mesh.OwnerPubkey || !strings.HasPrefix(reply["canonical_v2"].(string), canonical) ||
		!strings.HasSuffix(reply["canonical_v2"].(string), "|admin|"+mesh.OwnerPubkey) {
		t.Fatalf("claim reply %v", reply)
	}
	if after := b.counts(owner.MeshID); after.members != before.members+1 || after.used != before.used+1 {
		t.Fatalf("claim counts %+v -> %+v", before, after)
	}
	// Repeat claim with the same x25519 key: same member, nothing spent.
	if status, again := b.claimV2(inv.Code, pub); status != 200 || again["member_id"] != memberID || again["alreadyMember"] != true {
		t.Fatalf("repeat claim: %d %v", status, again)
	}
	// Unbound, it is in no listing.
	admin := client.Identity{MeshID: owner.MeshID, MemberID: owner.MemberID, DisplayName: owner.DisplayName}
	admin.Key, _ = owner.PrivateKey()
	status, members := memberGet(t, b, admin)
	if status != 200 || hasMember(members, memberID) {
		t.Fatalf("unbound member listed: %d %v", status, members)
	}
	// A hello naming a member id that is not a claim changes nothing.
	_, stranger, _ := ed25519.GenerateKey(nil)
	if _, err := b.tryConnect(client.Identity{MeshID: owner.MeshID, MemberID: owner.MemberID, DisplayName: "x", Key: stranger}, client.Options{}); err == nil {
		t.Fatal("a stranger's hello with the owner's member id was admitted")
	}
	// The claimant's first hello binds its fresh ed25519 key.
	_, edKey, _ := ed25519.GenerateKey(nil)
	var claimName string
	b.query(&claimName, "SELECT display_name FROM {member} WHERE id = ?", memberID)
	if claimName != "member-"+base64.RawURLEncoding.EncodeToString(pub[:])[:8] {
		t.Fatalf("claimed member named %q", claimName)
	}
	c := b.connect(client.Identity{MeshID: owner.MeshID, MemberID: memberID, DisplayName: "claimant", Key: edKey}, client.Options{DisplayName: "claimant-laptop"})
	var bound struct{ PeerPubkey, DisplayName string }
	b.query(&bound, "SELECT peer_pubkey, display_name FROM {member} WHERE id = ?", memberID)
	if bound.PeerPubkey != protocol.PubkeyHex(edKey) || bound.DisplayName != "claimant-laptop" {
		t.Fatalf("member after hello: %+v", bound)
	}
	if peers, err := c.ListPeers(ctxT(t)); err != nil || len(peers) == 0 {
		t.Fatalf("bound member cannot list peers: %v", err)
	}
	c.Kill()
	// Once bound, another key cannot take the member over.
	_, thief, _ := ed25519.GenerateKey(nil)
	if _, err := b.tryConnect(client.Identity{MeshID: owner.MeshID, MemberID: memberID, DisplayName: "thief", Key: thief}, client.Options{}); err == nil {
		t.Fatal("a second key bound the claimed member")
	}
	b.connect(client.Identity{MeshID: owner.MeshID, MemberID: memberID, DisplayName: "claimant", Key: edKey}, client.Options{})
	if status, members := memberGet(t, b, admin); status != 200 || !hasMember(members, memberID) {
		t.Fatalf("bound member not listed: %d %v", status, members)
	}

	// Refusals create nothing.
	revoked := b.invite(owner.MeshID, "--broker-url", b.url())
	b.cli("invite", "revoke", "--mesh", owner.MeshID, "--invite", revoked.ID)
	short := b.invite(owner.MeshID, "--expires", "2s", "--broker-url", b.url())
	used := b.invite(owner.MeshID, "--broker-url", b.url())
	p2, _ := x25519Key(t)
	if s, r := b.claimV2(used.Code, p2); s != 200 {
		t.Fatalf("claim: %d %v", s, r)
	}
	tampered := b.invite(owner.MeshID, "--broker-url", b.url())
	b.db.Exec("UPDATE "+b.db.Table("invite")+" SET capability_v2 = replace(capability_v2, '|member|', '|admin|') WHERE id = ?", tampered.ID)
	b.advance(5 * time.Second)
	before = b.counts(owner.MeshID)
	p3, _ := x25519Key(t)
	key := base64.RawURLEncoding.EncodeToString(p3[:])
	for _, c := range []struct {
		name, code string
		body       any
		status     int
		err        string
	}{
		{"unknown code", "Zz9Zz9Zz9Zz9", map[string]any{"recipient_x25519_pubkey": key}, 404, "not_found"},
		{"revoked", revoked.Code, map[string]any{"recipient_x25519_pubkey": key}, 410, "revoked"},
		{"expired", short.Code, map[string]any{"recipient_x25519_pubkey": key}, 410, "expired"},
		{"exhausted", used.Code, map[string]any{"recipient_x25519_pubkey": key}, 410, "exhausted"},
		{"tampered capability", tampered.Code, map[string]any{"recipient_x25519_pubkey": key}, 400, "bad_signature"},
		{"short key", inv.Code, map[string]any{"recipient_x25519_pubkey": "abc"}, 400, "malformed"},
		{"key not a string", inv.Code, map[string]any{"recipient_x25519_pubkey": 5}, 400, "malformed"},
		{"not JSON", inv.Code, "[", 400, "malformed"},
		{"bad code", "no-such!", map[string]any{"recipient_x25519_pubkey": key}, 400, "malformed"},
		{"oversized", inv.Code, `{"recipient_x25519_pubkey":"` + strings.Repeat("a", b.cfg.MaxMessageBytes) + `"}`, 413, "payload too large"},
	} {
		status, reply := postJSON(t, "POST", b.httpURL("/invites/"+c.code+"/claim"), c.body, nil)
		if status != c.status || reply["error"] != c.err {
			t.Errorf("%s: %d %v, want %d %q", c.name, status, reply, c.status, c.err)
		}
	}
	if after := b.counts(owner.MeshID); after != before {
		t.Fatalf("refused claims changed counts %+v -> %+v", before, after)
	}
}

// Two first hellos racing for one claimed member: one key binds, the
// other hello is refused, and the member keeps the winner's key.
func TestInviteV2BindRace(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	owner := newMeshFromCLI(t, b)
	for round := 0; round < 3; round++ {
		inv := b.invite(owner.MeshID, "--broker-url", b.url())
		pub, _ := x25519Key(t)
		status, reply := b.claimV2(inv.Code, pub)
		if status != 200 {
			t.Fatalf("claim: %d %v", status, reply)
		}
		memberID := reply["member_id"].(string)
		var keys [2]ed25519.PrivateKey
		var errs [2]error
		var wg sync.WaitGroup
		for i := range keys {
			_, keys[i], _ = ed25519.GenerateKey(nil)
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = b.tryConnect(client.Identity{MeshID: owner.MeshID, MemberID: memberID, DisplayName: "racer", Key: keys[i]}, client.Options{})
			}()
		}
		wg.Wait()
		if (errs[0] == nil) == (errs[1] == nil) {
			t.Fatalf("round %d: both or neither hello admitted: %v / %v", round, errs[0], errs[1])
		}
		winner := keys[0]
		if errs[0] != nil {
			winner = keys[1]
		}
		var bound string
		b.query(&bound, "SELECT peer_pubkey FROM {member} WHERE id = ?", memberID)
		if bound != protocol.PubkeyHex(winner) {
			t.Fatalf("round %d: member bound to %q, not the admitted key", round, bound)
		}
	}
}

// Claims racing for an invite's last use, through both protocols at once:
// exactly one wins, the others get invite_exhausted / exhausted, and one
// member is created.
func TestInviteLastUseRace(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	owner := newMeshFromCLI(t, b)
	for round := 0; round < 3; round++ {
		inv := b.invite(owner.MeshID, "--broker-url", b.url())
		before := b.counts(owner.MeshID)
		const racers = 8
		var wg sync.WaitGroup
		statuses := make([]int, racers)
		start := make(chan struct{})
		for i := range racers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				if i%2 == 0 {
					_, key, _ := ed25519.GenerateKey(nil)
					statuses[i], _ = b.joinV1(inv.Link, key, fmt.Sprintf("racer-%d", i))
				} else {
					pub, _ := x25519Key(t)
					statuses[i], _ = b.claimV2(inv.Code, pub)
				}
			}()
		}
		close(start)
		wg.Wait()
		won := 0
		for _, s := range statuses {
			switch s {
			case 200:
				won++
			case 410:
			default:
				t.Fatalf("round %d: unexpected status %d in %v", round, s, statuses)
			}
		}
		after := b.counts(owner.MeshID)
		if won != 1 || after.members != before.members+1 || after.used != before.used+1 {
			t.Fatalf("round %d: %d winners %v, counts %+v -> %+v", round, won, statuses, before, after)
		}
	}
}

func memberRequest(t *testing.T, b *testBroker, id *client.Identity, method, path string, body any, extra http.Header) (int, map[string]any) {
	t.Helper()
	raw := []byte{}
	if body != nil {
		if s, ok := body.(string); ok {
			raw = []byte(s)
		} else {
			raw, _ = json.Marshal(body)
		}
	}
	h := http.Header{}
	if id != nil {
		h = client.SignMemberRequest(*id, method, path, raw, time.Now())
	}
	for k, v := range extra {
		h[k] = v
	}
	return postJSON(t, method, b.httpURL(path), string(raw), h)
}

func memberGet(t *testing.T, b *testBroker, id client.Identity) (int, map[string]any) {
	return memberRequest(t, b, &id, "GET", "/mesh/"+id.MeshID+"/members", nil, nil)
}

func hasMember(reply map[string]any, id string) bool {
	list, _ := reply["members"].([]any)
	for _, m := range list {
		if m.(map[string]any)["id"] == id {
			return true
		}
	}
	return false
}

func findMember(reply map[string]any, id string) map[string]any {
	list, _ := reply["members"].([]any)
	for _, m := range list {
		if m.(map[string]any)["id"] == id {
			return m.(map[string]any)
		}
	}
	return nil
}
