package main

import (
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/protocol"
)

// Issue 7 over the socket: audit_query pages newest first with filters,
// audit_verify checks the chain and finds a tampered row; payloads carry
// metadata only.
func TestAuditOverSocket(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	// A join is audited just after its hello_ack goes out: wait for both,
	// so the send below is the newest entry.
	waitFor(t, 10*time.Second, "2 peer_joined rows", func() bool {
		var k int64
		b.query(&k, "SELECT count(*) FROM {audit_log} WHERE mesh_id = ? AND event_type = 'peer_joined'", f.meshID)
		return k == 2
	})
	n, c := sealTo(t, f.a.Key, pub(f.b.Key), "secret body")
	if _, err := a.Send(ctxT(t), client.SendRequest{TargetSpec: f.b.Pubkey(), Nonce: n, Ciphertext: c}); err != nil {
		t.Fatal(err)
	}
	waitFrame(t, bob, 10*time.Second, isMessage)
	waitFor(t, 10*time.Second, "3 audit rows", func() bool {
		var k int64
		b.query(&k, "SELECT count(*) FROM {audit_log} WHERE mesh_id = ?", f.meshID)
		return k == 3
	})
	fr, err := a.Request(ctxT(t), map[string]any{"type": "audit_query", "limit": 2})
	if err != nil {
		t.Fatal(err)
	}
	var res protocol.AuditResult
	_ = fr.Decode(&res)
	if res.Total != 3 || len(res.Entries) != 2 || res.Entries[0].EventType != "message_sent" || res.Entries[0].ID < res.Entries[1].ID {
		t.Fatalf("%s", fr.Raw)
	}
	if p := string(res.Entries[0].Payload); !strings.Contains(p, `"priority":"next"`) || strings.Contains(p, c) || strings.Contains(p, n) {
		t.Fatalf("message_sent payload %s", p)
	}
	fr, _ = a.Request(ctxT(t), map[string]any{"type": "audit_query", "eventType": "peer_joined"})
	_ = fr.Decode(&res)
	if res.Total != 2 || len(res.Entries) != 2 {
		t.Fatalf("filter: %s", fr.Raw)
	}
	fr, err = bob.Request(ctxT(t), map[string]any{"type": "audit_verify"})
	if err != nil || !strings.Contains(string(fr.Raw), `"valid":true`) || !strings.Contains(string(fr.Raw), `"entries":3`) {
		t.Fatalf("verify: %s %v", fr.Raw, err)
	}
	var ids []int64
	b.query(&ids, "SELECT id FROM {audit_log} WHERE mesh_id = ? ORDER BY id", f.meshID)
	b.exec("UPDATE {audit_log} SET payload = ? WHERE id = ?", `{"pubkey":"forged"}`, ids[1])
	fr, _ = bob.Request(ctxT(t), map[string]any{"type": "audit_verify"})
	var v protocol.AuditVerifyResult
	_ = fr.Decode(&v)
	if v.Valid || v.BrokenAt == nil || *v.BrokenAt != ids[1] || v.Entries != 3 {
		t.Fatalf("tampered verify: %s", fr.Raw)
	}
	if _, err := a.Request(ctxT(t), map[string]any{"type": "audit_query", "limit": "many"}); err == nil || !strings.Contains(err.Error(), "audit_query_error") {
		t.Fatalf("bad limit: %v", err)
	}
}
