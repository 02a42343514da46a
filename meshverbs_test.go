package main

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/protocol"
)

// End-to-end tests of the mesh verbs (mesh_info, list_bans, topic_members,
// topic_history, topic_mark_read), the member HTTP routes with their proof
// of membership and role rules, and list_peers' grace mark (issue 14).

func request(t *testing.T, c *client.Client, frame map[string]any) client.Frame {
	t.Helper()
	f, err := c.Request(ctxT(t), frame)
	if err != nil {
		t.Fatalf("%v: %v", frame["type"], err)
	}
	if f.Type == "error" {
		t.Fatalf("%v: %s", frame["type"], f.Raw)
	}
	return f
}

func TestMeshInfoAndBans(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{DisplayName: "alice-s", Groups: []protocol.Group{{Name: "ops", Role: "lead"}}})
	b.connect(f.b, client.Options{Groups: []protocol.Group{{Name: "dev"}}})
	_ = alice.WriteJSON(map[string]any{"type": "set_state", "key": "build", "value": "green"})
	_ = alice.WriteJSON(map[string]any{"type": "set_state", "key": "alpha", "value": 1})
	b.exec("INSERT INTO "+b.db.Table("stream")+" (id, mesh_id, name) VALUES (?, ?, 'logs')", "s1"+f.meshID[:20], f.meshID)
	fr := request(t, alice, map[string]any{"type": "mesh_info"})
	var info protocol.MeshInfoResult
	if err := fr.Decode(&info); err != nil {
		t.Fatal(err)
	}
	if fr.Type != "mesh_info_result" || info.Mesh != f.meshID || info.Peers != 2 || strings.Join(info.Groups, ",") != "@dev,@ops" ||
		strings.Join(info.StateKeys, ",") != "alpha,build" || strings.Join(info.Streams, ",") != "logs" || info.MemoryCount != 0 ||
		info.FileCount != 0 || info.Tasks != (protocol.TaskCounts{}) || info.Tables == nil || info.Collections == nil ||
		info.YourName != "alice-s" || len(info.YourGroups) != 1 || info.YourGroups[0].Name != "ops" || info.ReqID == "" {
		t.Fatalf("mesh_info: %s", fr.Raw)
	}
	fr = request(t, alice, map[string]any{"type": "list_bans"})
	var bans protocol.ListBansResult
	_ = fr.Decode(&bans)
	if fr.Type != "list_bans_result" || len(bans.Bans) != 1 || bans.Bans[0].Name != "rita" || bans.Bans[0].Pubkey != f.r.Pubkey() || bans.Bans[0].RevokedAt == "" {
		t.Fatalf("list_bans: %s", fr.Raw)
	}
}

func TestTopicMembersHistoryAndRead(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	carol := b.connect(f.c, client.Options{})
	var tc protocol.TopicCreated
	_ = request(t, alice, map[string]any{"type": "topic_create", "name": "dev"}).Decode(&tc)
	_ = bob.WriteJSON(map[string]any{"type": "topic_join", "topic": "dev"})
	fr := request(t, bob, map[string]any{"type": "topic_members", "topic": "dev"})
	var tm protocol.TopicMembersResponse
	_ = fr.Decode(&tm)
	if fr.Type != "topic_members_response" || tm.Topic != "dev" || len(tm.Members) != 2 || tm.Members[0].DisplayName != "alice" || tm.Members[0].Role != "lead" ||
		tm.Members[1].MemberID != f.b.MemberID || tm.Members[1].Pubkey != f.b.Pubkey() || tm.Members[1].LastReadAt != nil || tm.Members[1].JoinedAt == "" {
		t.Fatalf("topic_members: %s", fr.Raw)
	}
	// Five posts, then pages of two, newest first, across equal timestamps too.
	var ids []string
	for i := range 5 {
		ack, err := alice.Send(ctxT(t), client.SendRequest{TargetSpec: "#" + tc.Topic.ID, Ciphertext: "post-" + strconv.Itoa(i)})
		if err != nil || !ack.Queued {
			t.Fatalf("post %d: %+v %v", i, ack, err)
		}
		var id string
		b.query(&id, "SELECT id FROM {topic_message} WHERE topic_id = ? AND ciphertext = ?", tc.Topic.ID, "post-"+strconv.Itoa(i))
		ids = append(ids, id)
	}
	// Two posts in one microsecond: paging must neither skip nor repeat.
	tmsg := b.db.Table("topic_message")
	b.exec("UPDATE "+tmsg+" SET created_at = (SELECT created_at FROM "+tmsg+" WHERE id = ?) WHERE id = ?", ids[1], ids[2])
	var got []string
	before := ""
	for page := 0; page < 4; page++ {
		req := map[string]any{"type": "topic_history", "topic": "dev", "limit": 2}
		if before != "" {
			req["beforeId"] = before
		}
		var th protocol.TopicHistoryResponse
		fr := request(t, bob, req)
		_ = fr.Decode(&th)
		if fr.Type != "topic_history_response" || th.Topic != "dev" || len(th.Messages) > 2 {
			t.Fatalf("page %d: %s", page, fr.Raw)
		}
		for _, m := range th.Messages {
			if m.SenderMemberID != f.a.MemberID || m.SenderName != "alice" || m.SenderPubkey != f.a.Pubkey() || m.BodyVersion != 1 || m.CreatedAt == "" {
				t.Fatalf("entry %s", fr.Raw)
			}
			got = append(got, strings.TrimPrefix(m.Ciphertext, "post-"))
			before = m.ID
		}
		if len(th.Messages) == 0 {
			break
		}
	}
	if strings.Join(got, "") != "43210" && strings.Join(got, "") != "43120" {
		t.Fatalf("history order %v", got)
	}
	if e, err := bob.Request(ctxT(t), map[string]any{"type": "topic_history", "topic": "dev", "beforeId": "nope"}); err == nil {
		t.Fatalf("unknown beforeId answered %s", e.Raw)
	}
	if e, err := bob.Request(ctxT(t), map[string]any{"type": "topic_history", "topic": "dev", "limit": "ten"}); err == nil {
		t.Fatalf("bad limit answered %s", e.Raw)
	}
	// topic_mark_read: no reply, then lastReadAt is set for bob only.
	_ = bob.WriteJSON(map[string]any{"type": "topic_mark_read", "topic": "dev"})
	_ = request(t, bob, map[string]any{"type": "topic_members", "topic": tc.Topic.ID}).Decode(&tm)
	if tm.Members[1].LastReadAt == nil || tm.Members[0].LastReadAt != nil {
		t.Fatalf("after mark read: %+v", tm.Members)
	}
	// Unknown topic, and a private topic seen from a non-member.
	_ = carol.WriteJSON(map[string]any{"type": "topic_members", "topic": "nope", "_reqId": "x1"})
	ef := waitFrame(t, carol, 10*time.Second, func(f client.Frame) bool { return f.Type == "error" })
	if !strings.Contains(string(ef.Raw), `"code":"topic_not_found"`) {
		t.Fatalf("%s", ef.Raw)
	}
	_ = request(t, alice, map[string]any{"type": "topic_create", "name": "secret", "visibility": "private"})
	// topic_not_found echoes the request id in "id", as the reference does.
	for _, typ := range []string{"topic_members", "topic_history"} {
		_ = carol.WriteJSON(map[string]any{"type": typ, "topic": "secret", "_reqId": "p-" + typ})
		ef := waitFrame(t, carol, 10*time.Second, func(f client.Frame) bool { return f.Type == "error" })
		if !strings.Contains(string(ef.Raw), `"code":"topic_not_found"`) || !strings.Contains(string(ef.Raw), `"id":"p-`+typ+`"`) {
			t.Fatalf("%s of a private topic for a non-member: %s", typ, ef.Raw)
		}
	}
	if e, err := carol.Request(ctxT(t), map[string]any{"type": "topic_members"}); err == nil || !strings.Contains(err.Error(), "invalid_argument") {
		t.Fatalf("topic_members without topic: %s %v", e.Raw, err)
	}
}

func TestMemberRoutes(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	list := "/mesh/" + f.meshID + "/members"
	patch := func(id string) string { return "/mesh/" + f.meshID + "/member/" + id }
	settings := "/mesh/" + f.meshID + "/settings"
	hdr := func(member string) http.Header { return http.Header{"X-Member-Id": {member}} }

	// No live session and no signature: no list, and no forged header either.
	for _, h := range []http.Header{nil, hdr(f.b.MemberID)} {
		if status, reply := memberRequest(t, b, nil, "GET", list, nil, h); status != 401 || reply["ok"] != false || reply["error"] == nil {
			t.Fatalf("unproven GET: %d %v", status, reply)
		}
	}
	// Signed by carol (no socket): allowed. A bad or stale signature is not.
	status, reply := memberGet(t, b, f.c)
	if status != 200 || reply["ok"] != true || len(reply["members"].([]any)) != 3 || findMember(reply, f.r.MemberID) != nil {
		t.Fatalf("signed GET: %d %v", status, reply)
	}
	m := findMember(reply, f.a.MemberID)
	if m["displayName"] != "alice" || m["permission"] != "admin" || m["online"] != false || m["sessionCount"] != 0.0 || m["joinedAt"] == nil {
		t.Fatalf("member entry %v", m)
	}
	bad := client.SignMemberRequest(f.c, "GET", list, nil, time.Now())
	bad.Set("X-Claudemesh-Signature", strings.Repeat("0", 128))
	if status, reply := memberRequest(t, b, nil, "GET", list, nil, bad); status != 403 {
		t.Fatalf("bad signature: %d %v", status, reply)
	}
	stale := client.SignMemberRequest(f.c, "GET", list, nil, time.Now().Add(-10*time.Minute))
	if status, reply := memberRequest(t, b, nil, "GET", list, nil, stale); status != 401 {
		t.Fatalf("stale signature: %d %v", status, reply)
	}
	revoked := client.SignMemberRequest(f.r, "GET", list, nil, time.Now())
	if status, reply := memberRequest(t, b, nil, "GET", list, nil, revoked); status != 403 {
		t.Fatalf("revoked member: %d %v", status, reply)
	}
	otherMesh := b.fixture()
	if status, reply := memberRequest(t, b, nil, "GET", "/mesh/"+otherMesh.meshID+"/members", nil, client.SignMemberRequest(f.c, "GET", "/mesh/"+otherMesh.meshID+"/members", nil, time.Now())); status != 403 {
		t.Fatalf("member of another mesh: %d %v", status, reply)
	}

	// Bob's live session (from this address) is the CLI's proof.
	bob := b.connect(f.b, client.Options{})
	status, reply = memberRequest(t, b, nil, "GET", list, nil, nil)
	if status != 200 || findMember(reply, f.b.MemberID)["online"] != true {
		t.Fatalf("GET with a live session: %d %v", status, reply)
	}
	// Bob edits himself; his socket gets profile_updated.
	status, reply = memberRequest(t, b, nil, "PATCH", patch(f.b.MemberID), map[string]any{"displayName": "Bobby", "roleTag": "reviewer", "groups": []map[string]string{{"name": "dev", "role": "lead"}}, "messageMode": "inbox"}, hdr(f.b.MemberID))
	if status != 200 || reply["ok"] != true {
		t.Fatalf("self PATCH: %d %v", status, reply)
	}
	mem := reply["member"].(map[string]any)
	if mem["displayName"] != "Bobby" || mem["roleTag"] != "reviewer" || mem["messageMode"] != "inbox" || mem["permission"] != "member" {
		t.Fatalf("patched member %v", mem)
	}
	p := decodePush(t, waitFrame(t, bob, 10*time.Second, isEvent("profile_updated")))
	var changes map[string]any
	_ = json.Unmarshal(p.EventData, &changes)
	if p.SenderPubkey != "system" || changes["displayName"] != "Bobby" || changes["messageMode"] != "inbox" {
		t.Fatalf("profile_updated %+v %v", p, changes)
	}
	// Not allowed: another member's profile, his own permission, a header
	// naming a member without a live session, unknown fields, bad values.
	for _, c := range []struct {
		name   string
		target string
		body   any
		h      http.Header
		status int
	}{
		{"other member", f.c.MemberID, map[string]any{"displayName": "x"}, hdr(f.b.MemberID), 403},
		{"own permission", f.b.MemberID, map[string]any{"permission": "admin"}, hdr(f.b.MemberID), 403},
		{"forged X-Member-Id", f.c.MemberID, map[string]any{"displayName": "x"}, hdr(f.c.MemberID), 401},
		{"forged admin id", f.b.MemberID, map[string]any{"permission": "admin"}, hdr(f.a.MemberID), 401},
		{"unknown field", f.b.MemberID, map[string]any{"role": "admin"}, hdr(f.b.MemberID), 400},
		{"bad mode", f.b.MemberID, map[string]any{"messageMode": "loud"}, hdr(f.b.MemberID), 400},
		{"empty name", f.b.MemberID, map[string]any{"displayName": ""}, hdr(f.b.MemberID), 400},
		{"nothing", f.b.MemberID, map[string]any{}, hdr(f.b.MemberID), 400},
		{"not JSON", f.b.MemberID, "{", hdr(f.b.MemberID), 400},
		{"oversized", f.b.MemberID, `{"displayName":"` + strings.Repeat("a", b.cfg.MaxMessageBytes) + `"}`, hdr(f.b.MemberID), 413},
		{"no such member", "nobody", map[string]any{"displayName": "x"}, hdr(f.b.MemberID), 403},
	} {
		if status, reply := memberRequest(t, b, nil, "PATCH", patch(c.target), c.body, c.h); status != c.status || reply["ok"] != false || reply["error"] == nil {
			t.Errorf("%s: %d %v, want %d", c.name, status, reply, c.status)
		}
	}
	var carolName, bobRole string
	b.query(&carolName, "SELECT display_name FROM {member} WHERE id = ?", f.c.MemberID)
	b.query(&bobRole, "SELECT role FROM {member} WHERE id = ?", f.b.MemberID)
	if carolName != "carol" || bobRole != "member" {
		t.Fatalf("refused PATCHes changed rows: %q %q", carolName, bobRole)
	}
	// Settings: admins only. Alice, signed, locks displayName; bob may no
	// longer rename himself, alice may rename him and promote carol.
	lock := map[string]any{"selfEditable": map[string]bool{"displayName": false, "roleTag": true, "groups": true, "messageMode": true}}
	if status, reply := memberRequest(t, b, nil, "PATCH", settings, lock, hdr(f.b.MemberID)); status != 403 || reply["error"] != "admin access required" {
		t.Fatalf("member settings: %d %v", status, reply)
	}
	for _, body := range []any{map[string]any{"selfEditable": map[string]any{"displayName": "no"}}, map[string]any{"selfEditable": map[string]bool{"displayName": false}}, map[string]any{"other": 1}, map[string]any{}} {
		if status, reply := memberRequest(t, b, &f.a, "PATCH", settings, body, nil); status != 400 {
			t.Fatalf("bad settings %v: %d %v", body, status, reply)
		}
	}
	if status, reply := memberRequest(t, b, &f.a, "PATCH", settings, lock, nil); status != 200 || reply["ok"] != true {
		t.Fatalf("admin settings: %d %v", status, reply)
	}
	if status, reply := memberRequest(t, b, nil, "PATCH", patch(f.b.MemberID), map[string]any{"displayName": "Robert"}, hdr(f.b.MemberID)); status != 403 || reply["error"] != "admin-managed fields: displayName" {
		t.Fatalf("locked field: %d %v", status, reply)
	}
	if status, reply := memberRequest(t, b, nil, "PATCH", patch(f.b.MemberID), map[string]any{"roleTag": nil}, hdr(f.b.MemberID)); status != 200 || reply["member"].(map[string]any)["roleTag"] != nil {
		t.Fatalf("clear roleTag: %d %v", status, reply)
	}
	if status, reply := memberRequest(t, b, &f.a, "PATCH", patch(f.b.MemberID), map[string]any{"displayName": "Robert"}, nil); status != 200 {
		t.Fatalf("admin rename: %d %v", status, reply)
	}
	if status, reply := memberRequest(t, b, &f.a, "PATCH", patch(f.c.MemberID), map[string]any{"permission": "admin"}, nil); status != 200 || reply["member"].(map[string]any)["permission"] != "admin" {
		t.Fatalf("admin promote: %d %v", status, reply)
	}
}

// With MEMBER_API_SESSION_AUTH=false only signed calls are members.
func TestMemberRoutesSignedOnly(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.MemberAPISessionAuth = false })
	f := b.fixture()
	b.connect(f.b, client.Options{})
	list := "/mesh/" + f.meshID + "/members"
	if status, reply := memberRequest(t, b, nil, "GET", list, nil, http.Header{"X-Member-Id": {f.b.MemberID}}); status != 401 {
		t.Fatalf("unsigned with live session: %d %v", status, reply)
	}
	if status, _ := memberGet(t, b, f.b); status != 200 {
		t.Fatalf("signed: %d", status)
	}
}

// A peer whose socket dropped is marked in grace and listed after the
// live ones, so a client resolving a name picks the live socket.
func TestListPeersMarksGrace(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.LeaseTTL = 30 * time.Second })
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	s1 := client.NewSession()
	gone := b.connect(f.b, client.Options{Session: &s1, DisplayName: "bob-s", SessionID: "old"})
	s2 := client.NewSession()
	b.connect(f.b, client.Options{Session: &s2, DisplayName: "bob-s", SessionID: "new"})
	gone.Kill()
	var peers []protocol.PeerInfo
	waitFor(t, 10*time.Second, "bob's first session in grace", func() bool {
		var err error
		peers, err = alice.ListPeers(ctxT(t))
		return err == nil && len(peers) == 3 && peers[2].InGrace
	})
	if peers[2].Pubkey != s1.Pubkey() || peers[2].LeaseExpiresAt == "" || peers[1].Pubkey != s2.Pubkey() || peers[1].InGrace || peers[0].InGrace {
		t.Fatalf("peers %+v", peers)
	}
}

// Behind a proxy (CLIENT_IP_HEADER) the live-session proof compares the
// addresses the proxy reports, not the proxy's own.
func TestMemberRoutesClientIPHeader(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, func(c *config.Config) { c.ClientIPHeader = "X-Client-Ip" })
	f := b.fixture()
	b.connect(f.b, client.Options{Header: http.Header{"X-Client-Ip": {"203.0.113.7"}}})
	list := "/mesh/" + f.meshID + "/members"
	for _, c := range []struct {
		ip     string
		status int
	}{{"203.0.113.7", 200}, {"198.51.100.1", 401}, {"", 401}} {
		h := http.Header{"X-Member-Id": {f.b.MemberID}}
		if c.ip != "" {
			h.Set("X-Client-Ip", c.ip)
		}
		if status, reply := memberRequest(t, b, nil, "GET", list, nil, h); status != c.status {
			t.Errorf("from %q: %d %v, want %d", c.ip, status, reply, c.status)
		}
	}
}

// mesh_info counts the toolbox's memories and tasks once they exist: a
// forgotten memory is not counted, tasks are counted by status.
func TestMeshInfoCountsToolbox(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	alice := b.connect(f.a, client.Options{})
	kept := call(t, alice, map[string]any{"type": "remember", "content": "the build cache lives on the second volume"})
	gone := call(t, alice, map[string]any{"type": "remember", "content": "a note about to be forgotten"})
	call(t, alice, map[string]any{"type": "forget", "memoryId": gone["id"]})
	if kept["id"] == "" {
		t.Fatalf("remember: %v", kept)
	}
	created := call(t, alice, map[string]any{"type": "create_task", "title": "rotate the keys"})
	call(t, alice, map[string]any{"type": "create_task", "title": "write the runbook"})
	call(t, alice, map[string]any{"type": "claim_task", "taskId": created["id"]})

	fr := request(t, alice, map[string]any{"type": "mesh_info"})
	var info protocol.MeshInfoResult
	if err := fr.Decode(&info); err != nil {
		t.Fatal(err)
	}
	if info.MemoryCount != 1 || info.Tasks != (protocol.TaskCounts{Open: 1, Claimed: 1}) {
		t.Fatalf("mesh_info counts: %s", fr.Raw)
	}
}
