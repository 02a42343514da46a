package main

import (
	"context"
	"crypto/ed25519"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// Attacks on the handshake and the member routes that the rules of
// handshake_proof.go and memberapi.go are meant to hold off.

// The live-session proof of the member routes is the caller's address. A
// web page the member's browser opens comes from that same address, and
// the routes answer every origin (Access-Control-Allow-Origin: *), so the
// page must not be taken for the member: a request a browser sent (it
// carries Origin) needs the signed proof.
func TestMemberRoutesRefuseBrowserRequestsOnLiveSessionProof(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	b.connect(f.a, client.Options{}) // alice, the owner, runs her daemon on this machine
	evil := http.Header{"Origin": {"https://evil.example"}}

	list := "/mesh/" + f.meshID + "/members"
	if status, reply := memberRequest(t, b, nil, "GET", list, nil, evil); status != 401 {
		t.Fatalf("cross-origin GET on alice's live session: %d %v, want 401", status, reply)
	}
	// The page learns ids from the list (or an invite link) and promotes
	// bob through alice's admin rights.
	promote := map[string]any{"permission": "admin"}
	if status, reply := memberRequest(t, b, nil, "PATCH", "/mesh/"+f.meshID+"/member/"+f.b.MemberID, promote, evil); status != 401 {
		t.Fatalf("cross-origin PATCH on alice's live session: %d %v, want 401", status, reply)
	}
	settings := map[string]any{"selfEditable": map[string]bool{"displayName": true, "roleTag": true, "groups": true, "messageMode": true}}
	if status, reply := memberRequest(t, b, nil, "PATCH", "/mesh/"+f.meshID+"/settings", settings, evil); status != 401 {
		t.Fatalf("cross-origin settings PATCH on alice's live session: %d %v, want 401", status, reply)
	}
	var role []string
	b.query(&role, "SELECT role FROM "+b.db.Table("member")+" WHERE id = ?", f.b.MemberID)
	if len(role) != 1 || role[0] != "member" {
		t.Fatalf("bob's role after the cross-origin PATCH: %v", role)
	}
	// The CLI (no Origin) still gets in on the live session, and a signed
	// request from a browser still works.
	if status, reply := memberRequest(t, b, nil, "GET", list, nil, nil); status != 200 {
		t.Fatalf("CLI GET on the live session: %d %v", status, reply)
	}
	if status, reply := memberRequest(t, b, &f.c, "GET", list, nil, evil); status != 200 {
		t.Fatalf("signed GET with an Origin: %d %v", status, reply)
	}
}

// A member hello may carry a label no member holds yet. When a member
// later joins with that key and proves it in a member hello, the label's
// holder must lose it, as it does to a session hello (proof wins over a
// label): otherwise its pushes carry the new member's key as senderPubkey.
func TestMemberHelloEvictsForeignLabelOfItsKey(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(5*time.Second))
	f := b.fixture()
	_, daveKey, _ := ed25519.GenerateKey(nil)
	davePub := protocol.PubkeyHex(daveKey)

	// Bob squats dave's key before dave is a member: nothing refuses it.
	squatter := b.connect(f.b, client.Options{SessionPubkey: davePub})

	prov := services.NewProvisionService(b.db, time.Now)
	added, err := prov.AddMember(context.Background(), f.meshID, davePub, "dave", "member")
	if err != nil {
		t.Fatal(err)
	}
	dave := client.Identity{MeshID: f.meshID, MemberID: added.MemberID, DisplayName: "dave", Key: daveKey}
	b.connect(dave, client.Options{})

	select {
	case <-squatter.Done():
	case <-time.After(20 * time.Second):
		carol := b.connect(f.c, client.Options{})
		if _, err := squatter.SendSealed(ctxT(t), f.c.Pubkey(), pub(f.c.Key), "now", []byte("I am dave")); err == nil {
			if p := decodePush(t, waitFrame(t, carol, 10*time.Second, isMessage)); p.SenderPubkey == davePub {
				t.Fatal("bob still holds dave's key as his label: his push reached carol as dave's")
			}
		}
		t.Fatal("the member socket squatting dave's key was not closed when dave proved it")
	}
	if ce := squatter.CloseError(); ce == nil || ce.Code != 1008 || ce.Text != "session_pubkey_taken" {
		t.Fatalf("squatter close %+v, want 1008 session_pubkey_taken", ce)
	}
}

// An unauthenticated hello (any key signs its own hello) names a mesh id
// of its choosing; the broker caches the negative member lookup under that
// id. A mesh id is short; one as long as a frame must be refused before it
// is kept anywhere, or a few hundred hellos (member or session) pin tens
// of megabytes.
func TestHelloWithHugeMeshIDKeepsNothing(t *testing.T) {
	// Not parallel: it reads the whole process's heap.
	b := startTestBroker(t, func(c *config.Config) { c.MemberCacheTTL = 10 * time.Minute })
	const hellos, idBytes = 200, 60_000
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	pad := strings.Repeat("m", idBytes)
	for i := range hellos {
		_, k, _ := ed25519.GenerateKey(nil)
		id := client.Identity{MeshID: pad + protocol.PubkeyHex(k)[:8], MemberID: "", DisplayName: "x", Key: k}
		opts := client.Options{}
		if i%2 == 1 { // session hellos look their parent up the same way
			sess := client.NewSession()
			opts.Session = &sess
		}
		if _, err := b.tryConnect(id, opts); err == nil {
			t.Fatalf("hello %d into a made-up mesh was admitted", i)
		}
	}
	after := heap()
	if grown := int64(after) - int64(before); grown > hellos*idBytes/4 {
		t.Fatalf("heap grew by %d bytes after %d refused hellos with %d-byte mesh ids", grown, hellos, idBytes)
	}
}

// POST /hook/set-status takes no proof (03 §3.2): anyone who reaches the
// port may call it. Its rate limiter keeps a bucket per (pid, cwd) for
// RATE_LIMIT_IDLE, taken before anything is validated, so a flood of
// distinct cwds, each as long as a body, must not be kept as it came.
func TestHookFloodOfDistinctCwdsKeepsLittle(t *testing.T) {
	// Not parallel: it reads the whole process's heap.
	b := startTestBroker(t)
	const requests, cwdBytes = 200, 60_000
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	pad := strings.Repeat("d", cwdBytes)
	for i := range requests {
		body := map[string]any{"cwd": pad + strconv.Itoa(i), "pid": i, "status": "bogus"}
		if status, reply := postJSON(t, "POST", b.httpURL("/hook/set-status"), body, nil); status != 400 {
			t.Fatalf("hook %d: %d %v, want 400 invalid status", i, status, reply)
		}
	}
	after := heap()
	if grown := int64(after) - int64(before); grown > requests*cwdBytes/4 {
		t.Fatalf("heap grew by %d bytes after %d refused hook calls with %d-byte cwds", grown, requests, cwdBytes)
	}
}

// Attacks that hold: a resume token of a member revoked out of band (the
// web app) resumes nothing; a forged X-Member-Id rides no other member's
// live session; a topic id of another mesh does not resolve.
func TestAttacksThatHold(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(5*time.Second))
	f := b.fixture()

	bob := b.connect(f.b, client.Options{})
	tok := bob.HelloAck.ResumeToken
	bob.Kill()
	b.waitOffline(bob.HelloAck.PresenceID)
	b.exec("UPDATE "+b.db.Table("member")+" SET revoked_at = ? WHERE id = ?", time.Now().UTC(), f.b.MemberID)
	if c, err := b.tryConnect(f.b, client.Options{ResumeToken: tok}); err == nil {
		t.Fatalf("revoked bob resumed with his token: %s", c.AckRaw)
	}

	carol := b.connect(f.c, client.Options{})
	forged := http.Header{"X-Member-Id": {f.a.MemberID}}
	if status, reply := memberRequest(t, b, nil, "PATCH", "/mesh/"+f.meshID+"/member/"+f.c.MemberID, map[string]any{"permission": "admin"}, forged); status != 401 {
		t.Fatalf("carol's session with alice's X-Member-Id: %d %v", status, reply)
	}

	other := b.fixture()
	dave := b.connect(other.a, client.Options{})
	var tc protocol.TopicCreated
	_ = request(t, dave, map[string]any{"type": "topic_create", "name": "secret", "visibility": "public"}).Decode(&tc)
	if tc.Topic.ID == "" {
		t.Fatal("topic_create gave no id")
	}
	// Topic errors echo the request as "id" (the reference's shape), so
	// the error frame is awaited as such.
	for _, verb := range []string{"topic_history", "topic_members", "topic_mark_read"} {
		if err := carol.WriteJSON(map[string]any{"type": verb, "topic": tc.Topic.ID, "_reqId": verb}); err != nil {
			t.Fatal(err)
		}
		fr := waitFrame(t, carol, 10*time.Second, func(f client.Frame) bool {
			return f.Type == "error" || strings.HasPrefix(f.Type, "topic_")
		})
		var e protocol.ErrorFrame
		if _ = fr.Decode(&e); fr.Type != "error" || e.Code != protocol.CodeTopicNotFound {
			t.Fatalf("%s of another mesh's topic: %s", verb, fr.Raw)
		}
	}
}

// README, member routes: a live session stands for "the X-Member-Id member
// for PATCH, any member of the mesh for a GET without the header". A PATCH
// without the header must not be taken for whichever member happens to
// have a session at that address (here the admin, so it could promote).
func TestMemberPatchWithoutMemberIDNeedsProof(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	b.connect(f.a, client.Options{}) // the admin's daemon on this address
	if status, reply := memberRequest(t, b, nil, "PATCH", "/mesh/"+f.meshID+"/member/"+f.b.MemberID, map[string]any{"permission": "admin"}, nil); status != 401 {
		t.Fatalf("PATCH without X-Member-Id on the admin's live session: %d %v, want 401", status, reply)
	}
	settings := map[string]any{"selfEditable": map[string]bool{"displayName": false, "roleTag": false, "groups": false, "messageMode": false}}
	if status, reply := memberRequest(t, b, nil, "PATCH", "/mesh/"+f.meshID+"/settings", settings, nil); status != 401 {
		t.Fatalf("settings PATCH without X-Member-Id on the admin's live session: %d %v, want 401", status, reply)
	}
	var role []string
	b.query(&role, "SELECT role FROM "+b.db.Table("member")+" WHERE id = ?", f.b.MemberID)
	if len(role) != 1 || role[0] != "member" {
		t.Fatalf("bob's role: %v", role)
	}
	// Named, the admin's session is the proof, as the CLI uses it.
	if status, reply := memberRequest(t, b, nil, "PATCH", "/mesh/"+f.meshID+"/member/"+f.a.MemberID, map[string]any{"roleTag": "lead"}, http.Header{"X-Member-Id": {f.a.MemberID}}); status != 200 {
		t.Fatalf("CLI-style PATCH: %d %v", status, reply)
	}
}
