package services

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
	"github.com/claudemesh/meshbroker/protocol"
)

// ---- helpers (prefixed: other files of this package have tests too) ----

func auditCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func auditLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), nil))
}

// newAuditForTest builds a service that is not started; the test decides
// when the writer runs. Cleanup closes it.
func newAuditForTest(t *testing.T, db *models.DB) *AuditService {
	t.Helper()
	a := NewAuditService(db, auditLogger(t), NewMetrics(), time.Now)
	t.Cleanup(func() {
		if err := a.Close(context.Background()); err != nil {
			t.Errorf("close audit: %v", err)
		}
	})
	return a
}

func auditMakeMesh(t *testing.T, db *models.DB) string {
	t.Helper()
	m := models.Mesh{ID: models.NewID(), Name: "m", Slug: "m", OwnerUserID: "user-1"}
	if err := db.WithContext(t.Context()).Create(&m).Error; err != nil {
		t.Fatalf("create mesh: %v", err)
	}
	return m.ID
}

func auditClose(t *testing.T, a *AuditService) {
	t.Helper()
	if err := a.Close(auditCtx(t)); err != nil {
		t.Fatalf("close audit: %v", err)
	}
}

// auditRowsOf returns the mesh's rows in chain order.
func auditRowsOf(t *testing.T, db *models.DB, meshID string) []models.AuditLog {
	t.Helper()
	var rows []models.AuditLog
	if err := db.WithContext(t.Context()).Raw("SELECT * FROM "+db.Table("audit_log")+" WHERE mesh_id = ? ORDER BY id", meshID).Scan(&rows).Error; err != nil {
		t.Fatalf("read audit rows: %v", err)
	}
	return rows
}

func auditMetric(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	if m.Gauge != nil {
		return m.Gauge.GetValue()
	}
	return m.Counter.GetValue()
}

// auditWaitFor polls cond every few milliseconds until it holds or the
// deadline passes.
func auditWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func auditVerify(t *testing.T, a *AuditService, meshID string) protocol.AuditVerifyResult {
	t.Helper()
	res, err := a.Verify(auditCtx(t), meshID)
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	return res
}

func wantAuditValid(t *testing.T, res protocol.AuditVerifyResult, entries int64) {
	t.Helper()
	if !res.Valid || res.Entries != entries || res.BrokenAt != nil {
		t.Fatalf("verify = valid %v, entries %d, brokenAt %v; want valid with %d entries", res.Valid, res.Entries, auditFmtBroken(res.BrokenAt), entries)
	}
}

func wantAuditBrokenAt(t *testing.T, res protocol.AuditVerifyResult, entries, id int64) {
	t.Helper()
	if res.Valid || res.Entries != entries || res.BrokenAt == nil || *res.BrokenAt != id {
		t.Fatalf("verify = valid %v, entries %d, brokenAt %v; want broken at %d with %d entries", res.Valid, res.Entries, auditFmtBroken(res.BrokenAt), id, entries)
	}
}

func auditFmtBroken(p *int64) string {
	if p == nil {
		return "none"
	}
	return fmt.Sprint(*p)
}

func auditStrPtr(s string) *string { return &s }

func auditMillis(t *testing.T, s string) time.Time {
	t.Helper()
	ts, err := time.Parse(protocol.ISOLayout, s)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// ---- pure functions ----

func TestAuditLockKey(t *testing.T) {
	if got := auditLockKey("mesh1"); got != 870734828183836005 {
		t.Fatalf("auditLockKey(mesh1) = %d, want 870734828183836005 (04 §1.2)", got)
	}
	if auditLockKey("mesh2") == auditLockKey("mesh1") || auditLockKey("x") < 0 {
		t.Fatal("keys must differ per mesh and be non-negative")
	}
}

// The three vectors of 04 §1.3, from Go values where the document gives
// them, so CanonicalJSON is exercised on the way.
func TestChainHashVectors(t *testing.T) {
	payload1 := map[string]any{
		"pubkey": "abc", "restored": false, "role": "control-plane",
		"groups": []any{map[string]any{"role": "lead", "name": "dev"}},
	}
	canon1, err := CanonicalJSON(payload1)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"groups":[{"name":"dev","role":"lead"}],"pubkey":"abc","restored":false,"role":"control-plane"}`; string(canon1) != want {
		t.Fatalf("vector 1 canonical = %s", canon1)
	}
	h1 := ChainHash("genesis", "mesh1", "peer_joined", auditStrPtr("mem1"), canon1, auditMillis(t, "2026-04-15T12:00:00.000Z"))
	if h1 != "572945faac8dd3469d2469ddb0df4eb161325d9a10d7b7d3a7fe8e6956b40798" {
		t.Fatalf("vector 1 hash = %s", h1)
	}

	canon2, err := CanonicalJSON(map[string]any{})
	if err != nil {
		t.Fatal(err)
	}
	h2 := ChainHash(h1, "mesh1", "peer_left", nil, canon2, auditMillis(t, "2026-04-15T12:00:01.500Z"))
	if h2 != "104766b9e48602e59efd60fb7974fb2364bf015e77ef8a620b80042d6c3b9fad" {
		t.Fatalf("vector 2 hash = %s", h2)
	}

	// Vector 3 as the document writes it: JSON text with 1e21, -0 and 1e-7.
	raw := json.RawMessage(`{"key":"k<&>é","value":{"z":1.5,"a":[1e21,-0,0.1,100,"\u0001\n"],"m":null,"é":true,"b":1e-7}}`)
	canon3, err := CanonicalJSON(raw)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"key":"k<&>é","value":{"a":[1e+21,0,0.1,100,"\u0001\n"],"b":1e-7,"m":null,"z":1.5,"é":true}}`; string(canon3) != want {
		t.Fatalf("vector 3 canonical = %s\nwant %s", canon3, want)
	}
	// A createdAt with sub-millisecond digits hashes as its millisecond.
	at3 := auditMillis(t, "2026-04-15T12:00:02.007Z").Add(999 * time.Microsecond)
	h3 := ChainHash(h2, "mesh1", "state_set", auditStrPtr("mem1"), canon3, at3)
	if h3 != "a192a5b42b814eae20327b2aa863c19a5d747b1b2f0041b4718e79a0602bf5ed" {
		t.Fatalf("vector 3 hash = %s", h3)
	}
}

// ---- writing and verifying ----

// A chain written by the service links row to row, starts at genesis per
// mesh, stores the canonical payload and verifies.
func TestAuditChainWrittenAndVerified(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	meshA, meshB := auditMakeMesh(t, db), auditMakeMesh(t, db)
	a := newAuditForTest(t, db)
	a.Start()

	a.Record(meshA, "peer_joined", "mem1", "alice", map[string]any{
		"pubkey": "aa", "groups": []any{map[string]any{"name": "dev", "role": "lead"}}, "restored": false, "role": "control-plane",
	})
	a.Record(meshB, "peer_joined", "mem9", "", map[string]any{"pubkey": "bb", "groups": []any{}, "restored": true, "role": "control-plane"})
	a.Record(meshA, "message_sent", "mem1", "alice", map[string]any{"targetSpec": "*", "priority": "next"})
	a.Record(meshA, "state_set", "mem1", "alice", map[string]any{
		"key": "k\u2028<&>", "value": map[string]any{"big": 1e21, "small": 1e-7, "ints": []any{100, 12345678901234567890.0}, "😀": "\x01"},
	})
	a.Record(meshA, "peer_left", "", "", nil)

	auditWaitFor(t, "5 rows written", func() bool { return auditMetric(t, a.metrics.AuditWritten) == 5 })

	rows := auditRowsOf(t, db, meshA)
	if len(rows) != 4 {
		t.Fatalf("mesh A has %d rows, want 4", len(rows))
	}
	prev := "genesis"
	for _, r := range rows {
		if r.PrevHash != prev {
			t.Fatalf("row %d: prev_hash %s, want %s", r.ID, r.PrevHash, prev)
		}
		canon, err := CanonicalJSON(json.RawMessage(r.Payload))
		if err != nil {
			t.Fatal(err)
		}
		if want := ChainHash(prev, meshA, r.EventType, r.ActorMemberID, canon, r.CreatedAt); r.Hash != want {
			t.Fatalf("row %d: hash %s, want %s", r.ID, r.Hash, want)
		}
		prev = r.Hash
	}
	last := rows[3]
	if last.EventType != "peer_left" || last.ActorMemberID != nil || last.ActorDisplayName != nil || string(last.Payload) != "{}" {
		t.Fatalf("system row stored as %+v (payload %s)", last, last.Payload)
	}
	if b := auditRowsOf(t, db, meshB); len(b) != 1 || b[0].PrevHash != "genesis" || b[0].ActorDisplayName != nil {
		t.Fatalf("mesh B rows: %+v", b)
	}

	wantAuditValid(t, auditVerify(t, a, meshA), 4)
	wantAuditValid(t, auditVerify(t, a, meshB), 1)
	wantAuditValid(t, auditVerify(t, a, "no-such-mesh"), 0)
	if got := auditMetric(t, a.metrics.AuditPending); got != 0 {
		t.Fatalf("pending gauge = %v, want 0", got)
	}

	// Appending after a verify continues the same chain.
	a.Record(meshA, "member_unbanned", "mem1", "alice", map[string]any{"target": "bob"})
	auditClose(t, a)
	wantAuditValid(t, auditVerify(t, a, meshA), 5)
}

// What is hashed is fixed when Record is called: the time, and the payload
// even if the caller changes its map afterwards.
func TestAuditRecordSnapshotsTimeAndPayload(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	mesh := auditMakeMesh(t, db)
	var mu sync.Mutex
	clock := time.Date(2026, 4, 15, 12, 0, 0, 7_654_321, time.FixedZone("X", 3600))
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	a := NewAuditService(db, auditLogger(t), NewMetrics(), now)

	payload := map[string]any{"key": "k", "value": map[string]any{"a": 1}}
	a.Record(mesh, "state_set", "mem1", "alice", payload)
	payload["key"] = "changed"
	payload["value"].(map[string]any)["a"] = 2
	mu.Lock()
	clock = clock.Add(time.Hour)
	mu.Unlock()

	auditClose(t, a) // the writer first runs here
	rows := auditRowsOf(t, db, mesh)
	if len(rows) != 1 {
		t.Fatalf("%d rows, want 1", len(rows))
	}
	canon, _ := CanonicalJSON(json.RawMessage(rows[0].Payload))
	if string(canon) != `{"key":"k","value":{"a":1}}` {
		t.Errorf("stored payload %s, want the payload as it was at Record", canon)
	}
	if want := time.Date(2026, 4, 15, 11, 0, 0, 7_000_000, time.UTC); !rows[0].CreatedAt.Equal(want) {
		t.Errorf("created_at %v, want %v (Record time, UTC, ms)", rows[0].CreatedAt, want)
	}
	wantAuditValid(t, auditVerify(t, a, mesh), 1)
}

// Editing any hashed column breaks the chain at that row; deleting a middle
// row breaks it at the next; harmless edits do not (04 §1.8, §9 audit 4).
func TestAuditVerifyDetectsTampering(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	table := db.Table("audit_log")

	// setup writes five rows to a fresh mesh and returns their ids.
	setup := func(t *testing.T) (string, []int64, *AuditService) {
		mesh := auditMakeMesh(t, db)
		a := newAuditForTest(t, db)
		for i := range 5 {
			a.Record(mesh, "message_sent", fmt.Sprintf("mem%d", i), "name", map[string]any{"targetSpec": fmt.Sprintf("@g%d", i), "priority": "now"})
		}
		auditClose(t, a)
		var ids []int64
		for _, r := range auditRowsOf(t, db, mesh) {
			ids = append(ids, r.ID)
		}
		if len(ids) != 5 {
			t.Fatalf("%d rows, want 5", len(ids))
		}
		return mesh, ids, a
	}
	exec := func(t *testing.T, q string, args ...any) {
		t.Helper()
		modelstest.MustExec(t, db, q, args...)
	}

	t.Run("untouched", func(t *testing.T) {
		mesh, _, a := setup(t)
		wantAuditValid(t, auditVerify(t, a, mesh), 5)
	})
	t.Run("payload_updated", func(t *testing.T) {
		mesh, ids, a := setup(t)
		exec(t, "UPDATE "+table+` SET payload = '{"x":1}' WHERE id = ?`, ids[2])
		wantAuditBrokenAt(t, auditVerify(t, a, mesh), 5, ids[2])
	})
	t.Run("actor_member_id_updated", func(t *testing.T) {
		mesh, ids, a := setup(t)
		exec(t, "UPDATE "+table+" SET actor_member_id = 'mallory' WHERE id = ?", ids[1])
		wantAuditBrokenAt(t, auditVerify(t, a, mesh), 5, ids[1])
	})
	t.Run("actor_member_id_nulled", func(t *testing.T) {
		mesh, ids, a := setup(t)
		exec(t, "UPDATE "+table+" SET actor_member_id = NULL WHERE id = ?", ids[3])
		wantAuditBrokenAt(t, auditVerify(t, a, mesh), 5, ids[3])
	})
	t.Run("event_type_updated", func(t *testing.T) {
		mesh, ids, a := setup(t)
		exec(t, "UPDATE "+table+" SET event_type = 'peer_left' WHERE id = ?", ids[0])
		wantAuditBrokenAt(t, auditVerify(t, a, mesh), 5, ids[0])
	})
	t.Run("created_at_moved_one_ms", func(t *testing.T) {
		mesh, ids, a := setup(t)
		rows := auditRowsOf(t, db, mesh)
		exec(t, "UPDATE "+table+" SET created_at = ? WHERE id = ?", rows[4].CreatedAt.Add(time.Millisecond), ids[4])
		wantAuditBrokenAt(t, auditVerify(t, a, mesh), 5, ids[4])
	})
	t.Run("hash_rewritten_consistently_breaks_next", func(t *testing.T) {
		// Re-hashing an edited row is not enough: the next row's prev_hash
		// still names the old hash.
		mesh, ids, a := setup(t)
		rows := auditRowsOf(t, db, mesh)
		canon := []byte(`{"x":1}`)
		h := ChainHash(rows[2].PrevHash, mesh, rows[2].EventType, rows[2].ActorMemberID, canon, rows[2].CreatedAt)
		exec(t, "UPDATE "+table+` SET payload = '{"x":1}', hash = ? WHERE id = ?`, h, ids[2])
		wantAuditBrokenAt(t, auditVerify(t, a, mesh), 5, ids[3])
	})
	t.Run("two_rows_swapped", func(t *testing.T) {
		// Swapping every column but id is swapping the rows' ids, which
		// Postgres's GENERATED ALWAYS identity would not allow directly.
		mesh, ids, a := setup(t)
		rows := auditRowsOf(t, db, mesh)
		set := "UPDATE " + table + " SET event_type = ?, actor_member_id = ?, actor_display_name = ?, payload = ?, prev_hash = ?, hash = ?, created_at = ? WHERE id = ?"
		for _, p := range [][2]int{{1, 2}, {2, 1}} {
			r := rows[p[1]]
			exec(t, set, r.EventType, r.ActorMemberID, r.ActorDisplayName, r.Payload, r.PrevHash, r.Hash, r.CreatedAt, ids[p[0]])
		}
		wantAuditBrokenAt(t, auditVerify(t, a, mesh), 5, ids[1])
	})
	t.Run("middle_row_deleted", func(t *testing.T) {
		mesh, ids, a := setup(t)
		exec(t, "DELETE FROM "+table+" WHERE id = ?", ids[2])
		wantAuditBrokenAt(t, auditVerify(t, a, mesh), 4, ids[3])
	})
	t.Run("first_row_deleted", func(t *testing.T) {
		mesh, ids, a := setup(t)
		exec(t, "DELETE FROM "+table+" WHERE id = ?", ids[0])
		wantAuditBrokenAt(t, auditVerify(t, a, mesh), 4, ids[1])
	})
	t.Run("tail_row_deleted_is_not_detected", func(t *testing.T) {
		mesh, ids, a := setup(t)
		exec(t, "DELETE FROM "+table+" WHERE id = ?", ids[4])
		wantAuditValid(t, auditVerify(t, a, mesh), 4)
	})
	t.Run("display_name_and_key_order_are_not_hashed", func(t *testing.T) {
		mesh, ids, a := setup(t)
		exec(t, "UPDATE "+table+" SET actor_display_name = 'someone else' WHERE id = ?", ids[1])
		// Same payload, keys reordered and spaced (jsonb normalizes it anyway).
		exec(t, "UPDATE "+table+` SET payload = '{ "targetSpec" : "@g2", "priority" : "now" }' WHERE id = ?`, ids[2])
		wantAuditValid(t, auditVerify(t, a, mesh), 5)
	})
}

// A row the reference wrote for a send without priority was hashed over
// `"priority":undefined` (04 §1.3). A1b: it verifies, and the chain carries
// on under meshbroker. The undefined text is accepted for nothing else.
func TestAuditVerifyAcceptsReferenceUndefinedPriority(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	table := db.Table("audit_log")
	insert := func(t *testing.T, mesh, event, prev string, payloadStored, payloadHashed string, at time.Time) string {
		t.Helper()
		h := ChainHash(prev, mesh, event, auditStrPtr("mem1"), []byte(payloadHashed), at)
		modelstest.MustExec(t, db, "INSERT INTO "+table+" (mesh_id, event_type, actor_member_id, actor_display_name, payload, prev_hash, hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
			mesh, event, "mem1", "alice", payloadStored, prev, h, at)
		return h
	}
	at := time.Date(2026, 4, 15, 12, 0, 0, 123_000_000, time.UTC)

	// The exact text the reference hashed, and what jcs produces for it.
	undef, err := CanonicalJSON(map[string]any{"targetSpec": "*", "priority": jsUndefined{}})
	if err != nil || string(undef) != `{"priority":undefined,"targetSpec":"*"}` {
		t.Fatalf("undefined text = %s, %v", undef, err)
	}

	t.Run("message_sent_without_priority_verifies_and_continues", func(t *testing.T) {
		mesh := auditMakeMesh(t, db)
		h := insert(t, mesh, "peer_joined", "genesis", `{"pubkey":"aa"}`, `{"pubkey":"aa"}`, at)
		insert(t, mesh, "message_sent", h, `{"targetSpec":"*"}`, `{"priority":undefined,"targetSpec":"*"}`, at.Add(time.Millisecond))
		a := newAuditForTest(t, db)
		wantAuditValid(t, auditVerify(t, a, mesh), 2)

		a.Record(mesh, "message_sent", "mem1", "alice", map[string]any{"targetSpec": "@dev", "priority": "next"})
		auditClose(t, a)
		wantAuditValid(t, auditVerify(t, a, mesh), 3)
	})
	t.Run("undefined_text_is_not_accepted_for_other_events", func(t *testing.T) {
		mesh := auditMakeMesh(t, db)
		insert(t, mesh, "peer_left", "genesis", `{"targetSpec":"*"}`, `{"priority":undefined,"targetSpec":"*"}`, at)
		a := newAuditForTest(t, db)
		res := auditVerify(t, a, mesh)
		if res.Valid {
			t.Fatal("a peer_left row hashed over undefined verified")
		}
	})
	t.Run("undefined_text_is_not_accepted_when_priority_is_stored", func(t *testing.T) {
		mesh := auditMakeMesh(t, db)
		insert(t, mesh, "message_sent", "genesis", `{"priority":"now","targetSpec":"*"}`, `{"priority":undefined,"targetSpec":"*"}`, at)
		a := newAuditForTest(t, db)
		if auditVerify(t, a, mesh).Valid {
			t.Fatal("a row with a stored priority verified against the undefined text")
		}
	})
}

// Two brokers (two AuditService instances on separate connection pools)
// appending to one mesh of one Postgres database concurrently produce one
// unbroken chain: the advisory lock serializes them (A2, 04 §9 audit 5).
// On SQLite the same holds for two handles on one file through BEGIN
// IMMEDIATE.
func TestAuditConcurrentWritersKeepOneChain(t *testing.T) {
	ctx := auditCtx(t)
	var db1, db2 *models.DB
	if auditOnPostgres() {
		url := modelstest.FreshPostgresURL(t)
		db1, db2 = modelstest.Open(t, url), modelstest.Open(t, url)
	} else {
		dir := t.TempDir()
		for _, p := range []**models.DB{&db1, &db2} {
			db, err := models.Open(ctx, "", dir, auditLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			*p = db
		}
	}
	if err := db1.Bootstrap(ctx); err != nil {
		t.Fatal(err)
	}
	mesh, other := auditMakeMesh(t, db1), auditMakeMesh(t, db1)

	a1, a2 := newAuditForTest(t, db1), newAuditForTest(t, db2)
	a1.Start()
	a2.Start()
	const perGoroutine, goroutines = 150, 4
	var wg sync.WaitGroup
	for g := range goroutines {
		a := a1
		if g%2 == 1 {
			a = a2
		}
		wg.Go(func() {
			for i := range perGoroutine {
				a.Record(mesh, "message_sent", fmt.Sprintf("mem%d", g), "", map[string]any{"targetSpec": "*", "priority": "next", "n": i})
				if i%10 == 0 {
					a.Record(other, "peer_left", "", "", map[string]any{})
				}
			}
		})
	}
	wg.Wait()
	auditClose(t, a1)
	auditClose(t, a2)

	for _, a := range []*AuditService{a1, a2} {
		if f := auditMetric(t, a.metrics.AuditFailed); f != 0 {
			t.Fatalf("%v entries failed", f)
		}
	}
	const want = perGoroutine * goroutines
	wantAuditValid(t, auditVerify(t, a1, mesh), want)
	wantAuditValid(t, auditVerify(t, a2, other), want/10)
	var forks int64
	if err := db1.WithContext(ctx).Raw("SELECT count(*) FROM (SELECT prev_hash FROM " + db1.Table("audit_log") +
		" GROUP BY mesh_id, prev_hash HAVING count(*) > 1) AS f").Scan(&forks).Error; err != nil {
		t.Fatal(err)
	}
	if forks != 0 {
		t.Fatalf("%d prev_hash values are shared by two rows: the chain forked", forks)
	}
}

func auditOnPostgres() bool {
	return os.Getenv(modelstest.EnvDatabaseURL) != ""
}

// ---- shutdown and overload ----

// Close writes everything still queued; none of it is lost (A2).
func TestAuditCloseFlushesEverythingQueued(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	meshes := []string{auditMakeMesh(t, db), auditMakeMesh(t, db), auditMakeMesh(t, db)}
	a := newAuditForTest(t, db) // never started: Close must start the writer itself
	const n = 3300              // over auditVerifyPage rows per mesh, so Verify pages
	for i := range n {
		a.Record(meshes[i%3], "message_sent", "mem1", "alice", map[string]any{"targetSpec": "*", "priority": "low", "i": i})
	}
	if got := auditMetric(t, a.metrics.AuditPending); got != n {
		t.Fatalf("pending gauge = %v, want %d", got, n)
	}
	auditClose(t, a)

	var rows int64
	if err := db.WithContext(t.Context()).Raw("SELECT count(*) FROM " + db.Table("audit_log")).Scan(&rows).Error; err != nil {
		t.Fatal(err)
	}
	if rows != n {
		t.Fatalf("%d rows after Close, want %d", rows, n)
	}
	if w, f, p := auditMetric(t, a.metrics.AuditWritten), auditMetric(t, a.metrics.AuditFailed), auditMetric(t, a.metrics.AuditPending); w != n || f != 0 || p != 0 {
		t.Fatalf("written %v, failed %v, pending %v; want %d, 0, 0", w, f, p, n)
	}
	for i, m := range meshes {
		wantAuditValid(t, auditVerify(t, a, m), int64(n/3+map[bool]int{true: 1}[i < n%3]))
	}

	// A break on the first page of a long chain still counts every row.
	chain := auditRowsOf(t, db, meshes[0])
	modelstest.MustExec(t, db, "DELETE FROM "+db.Table("audit_log")+" WHERE id = ?", chain[10].ID)
	wantAuditBrokenAt(t, auditVerify(t, a, meshes[0]), int64(len(chain)-1), chain[11].ID)
}

// Close with a context that has already ended abandons what is left, but
// counts and logs every entry, and still returns once the writer is gone.
func TestAuditCloseDeadlineCountsWhatIsLeft(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	mesh := auditMakeMesh(t, db)
	a := newAuditForTest(t, db)
	const n = 2000
	for i := range n {
		a.Record(mesh, "peer_left", "", "", map[string]any{"i": i})
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := a.Close(ctx); err == nil {
		// The writer may have drained everything before Close looked.
		t.Log("close finished before the deadline mattered")
	}
	w, f, p := auditMetric(t, a.metrics.AuditWritten), auditMetric(t, a.metrics.AuditFailed), auditMetric(t, a.metrics.AuditPending)
	if w+f != n || p != 0 {
		t.Fatalf("written %v + failed %v != %d, pending %v", w, f, n, p)
	}
	wantAuditValid(t, auditVerify(t, a, mesh), int64(w))
}

func TestAuditRecordAfterCloseIsCountedNotQueued(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	mesh := auditMakeMesh(t, db)
	a := newAuditForTest(t, db)
	auditClose(t, a)
	a.Record(mesh, "peer_left", "mem1", "", nil)
	if f, p := auditMetric(t, a.metrics.AuditFailed), auditMetric(t, a.metrics.AuditPending); f != 1 || p != 0 {
		t.Fatalf("failed %v, pending %v; want 1, 0", f, p)
	}
	if rows := auditRowsOf(t, db, mesh); len(rows) != 0 {
		t.Fatalf("%d rows, want 0", len(rows))
	}
}

// A full queue never blocks Record; the overflow is counted.
func TestAuditQueueFullCountsAndNeverBlocks(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	mesh := auditMakeMesh(t, db)
	a := newAuditForTest(t, db)
	a.queue = make(chan *auditEntry, 2) // before any use; the writer is not running
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 5 {
			a.Record(mesh, "peer_left", "", "", nil)
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Record blocked on a full queue")
	}
	if f, p := auditMetric(t, a.metrics.AuditFailed), auditMetric(t, a.metrics.AuditPending); f != 3 || p != 2 {
		t.Fatalf("failed %v, pending %v; want 3, 2", f, p)
	}
	auditClose(t, a)
	wantAuditValid(t, auditVerify(t, a, mesh), 2)
}

// RecordPaced waits for room instead of dropping: with the queue full and
// the writer not yet running it does not return, and once the writer runs
// its entry is written like the others.
func TestAuditRecordPacedWaitsForRoom(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	mesh := auditMakeMesh(t, db)
	a := newAuditForTest(t, db)
	a.queue = make(chan *auditEntry, 2) // before any use; the writer is not running
	a.Record(mesh, "peer_left", "", "", nil)
	a.Record(mesh, "peer_left", "", "", nil)
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.RecordPaced(mesh, "message_sent", "m1", "alice", map[string]any{"targetSpec": "*", "priority": "now"})
	}()
	select {
	case <-done:
		t.Fatal("RecordPaced returned while the queue was full")
	case <-time.After(50 * time.Millisecond):
	}
	a.Start()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("RecordPaced still waiting after the writer started")
	}
	auditClose(t, a)
	if f, w := auditMetric(t, a.metrics.AuditFailed), auditMetric(t, a.metrics.AuditWritten); f != 0 || w != 3 {
		t.Fatalf("failed %v, written %v; want 0, 3", f, w)
	}
	wantAuditValid(t, auditVerify(t, a, mesh), 3)
}

// One entry the database refuses does not take its batch with it: a mesh
// that does not exist (foreign key), and on Postgres a string holding
// U+0000, which jsonb cannot store.
func TestAuditRefusedEntryDoesNotSinkItsBatch(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	mesh := auditMakeMesh(t, db)
	a := newAuditForTest(t, db)
	a.Record(mesh, "peer_left", "m1", "", nil)
	a.Record("no-such-mesh", "peer_left", "m1", "", nil)
	a.Record(mesh, "peer_left", "m2", "", nil)
	a.Record(mesh, "state_set", "m3", "", map[string]any{"key": "nul\x00", "size": 1})
	a.Record(mesh, "peer_left", "m4", "", nil)
	auditClose(t, a)

	wantRows, wantFailed := 4, 1.0
	if db.IsPostgres() {
		wantRows, wantFailed = 3, 2
	}
	if f := auditMetric(t, a.metrics.AuditFailed); f != wantFailed {
		t.Fatalf("failed %v, want %v", f, wantFailed)
	}
	if w := auditMetric(t, a.metrics.AuditWritten); w != float64(wantRows) {
		t.Fatalf("written %v, want %d", w, wantRows)
	}
	wantAuditValid(t, auditVerify(t, a, mesh), int64(wantRows))
}

// ---- query ----

func TestAuditQuery(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	mesh, other := auditMakeMesh(t, db), auditMakeMesh(t, db)
	a := newAuditForTest(t, db)
	events := []string{"peer_joined", "message_sent", "peer_left"}
	const n = 600
	for i := range n {
		member, name := fmt.Sprintf("mem%d", i), fmt.Sprintf("name%d", i)
		switch i % 4 {
		case 1:
			name = "" // actor falls back to the member id
		case 2:
			member, name = "", "" // system
		}
		a.Record(mesh, events[i%3], member, name, map[string]any{"i": i, "s": "<é>"})
	}
	a.Record(other, "peer_left", "x", "x", nil)
	auditClose(t, a)
	ctx := auditCtx(t)

	query := func(t *testing.T, q AuditQuery) protocol.AuditResult {
		t.Helper()
		res, err := a.Query(ctx, mesh, q)
		if err != nil {
			t.Fatalf("query %+v: %v", q, err)
		}
		if res.Type != "audit_result" || res.Entries == nil {
			t.Fatalf("result type %q, entries nil %v", res.Type, res.Entries == nil)
		}
		for i := 1; i < len(res.Entries); i++ {
			if res.Entries[i].ID >= res.Entries[i-1].ID {
				t.Fatalf("entries not newest first at %d", i)
			}
		}
		return res
	}
	rows := auditRowsOf(t, db, mesh)
	newest := rows[len(rows)-1]

	t.Run("defaults", func(t *testing.T) {
		res := query(t, NewAuditQuery())
		if len(res.Entries) != 50 || res.Total != n {
			t.Fatalf("%d entries, total %d; want 50, %d", len(res.Entries), res.Total, n)
		}
		e := res.Entries[0]
		if e.ID != newest.ID || e.Hash != newest.Hash || e.CreatedAt != protocol.ISO(newest.CreatedAt) || e.EventType != newest.EventType {
			t.Fatalf("first entry %+v, want the newest row %+v", e, newest)
		}
		var p map[string]any
		if err := json.Unmarshal(e.Payload, &p); err != nil || p["i"] != float64(n-1) || p["s"] != "<é>" {
			t.Fatalf("payload %s (%v)", e.Payload, err)
		}
		if _, err := time.Parse(protocol.ISOLayout, e.CreatedAt); err != nil || !strings.HasSuffix(e.CreatedAt, "Z") {
			t.Fatalf("createdAt %q is not ISO", e.CreatedAt)
		}
	})
	t.Run("offset_pages_on", func(t *testing.T) {
		first := query(t, AuditQuery{Limit: 10})
		second := query(t, AuditQuery{Limit: 10, Offset: 10})
		if second.Entries[0].ID >= first.Entries[9].ID || second.Total != n {
			t.Fatalf("page 2 starts at %d after page 1 ended at %d", second.Entries[0].ID, first.Entries[9].ID)
		}
		if past := query(t, AuditQuery{Limit: 10, Offset: n}); len(past.Entries) != 0 || past.Total != n {
			t.Fatalf("past the end: %d entries, total %d", len(past.Entries), past.Total)
		}
	})
	t.Run("limit_capped_at_500", func(t *testing.T) {
		for _, limit := range []int{501, 100000, -1} {
			if res := query(t, AuditQuery{Limit: limit}); len(res.Entries) != MaxAuditQueryLimit || res.Total != n {
				t.Fatalf("limit %d: %d entries, total %d", limit, len(res.Entries), res.Total)
			}
		}
	})
	t.Run("limit_zero_gives_only_total", func(t *testing.T) {
		res := query(t, AuditQuery{Limit: 0})
		if len(res.Entries) != 0 || res.Total != n {
			t.Fatalf("%d entries, total %d", len(res.Entries), res.Total)
		}
		if f := protocol.MustEncode(res); !strings.Contains(string(f), `"entries":[]`) || strings.Contains(string(f), "_reqId") {
			t.Fatalf("encoded %s", f)
		}
	})
	t.Run("event_type_filters_rows_and_total", func(t *testing.T) {
		res := query(t, AuditQuery{Limit: 1000, EventType: "peer_left"})
		if res.Total != n/3 || len(res.Entries) != n/3 {
			t.Fatalf("%d entries, total %d; want %d", len(res.Entries), res.Total, n/3)
		}
		for _, e := range res.Entries {
			if e.EventType != "peer_left" {
				t.Fatalf("entry of type %s", e.EventType)
			}
		}
		if none := query(t, AuditQuery{Limit: 5, EventType: "nope"}); none.Total != 0 || len(none.Entries) != 0 {
			t.Fatalf("unknown type: %+v", none)
		}
	})
	t.Run("actor_falls_back", func(t *testing.T) {
		res := query(t, AuditQuery{Limit: 4})
		for _, e := range res.Entries {
			var p struct{ I int }
			if err := json.Unmarshal(e.Payload, &p); err != nil {
				t.Fatal(err)
			}
			want := map[int]string{0: fmt.Sprintf("name%d", p.I), 1: fmt.Sprintf("mem%d", p.I), 2: "system", 3: fmt.Sprintf("name%d", p.I)}[p.I%4]
			if e.Actor != want {
				t.Fatalf("entry %d: actor %q, want %q", p.I, e.Actor, want)
			}
		}
	})
	t.Run("negative_offset_is_an_audit_query_error", func(t *testing.T) {
		_, err := a.Query(ctx, mesh, AuditQuery{Limit: 5, Offset: -1})
		if e, ok := AsError(err); !ok || e.Code != protocol.CodeAuditQueryError {
			t.Fatalf("err = %v, want code %s", err, protocol.CodeAuditQueryError)
		}
	})
}

func TestAuditVerifyResultEncoding(t *testing.T) {
	id := int64(7)
	for _, tt := range []struct {
		in   protocol.AuditVerifyResult
		want string
	}{
		{protocol.AuditVerifyResult{Type: "audit_verify_result", Valid: true, Entries: 3}, `{"type":"audit_verify_result","valid":true,"entries":3}`},
		{protocol.AuditVerifyResult{Type: "audit_verify_result", Entries: 3, BrokenAt: &id, ReqID: "r1"}, `{"type":"audit_verify_result","valid":false,"entries":3,"brokenAt":7,"_reqId":"r1"}`},
	} {
		if got := string(protocol.MustEncode(tt.in)); got != tt.want {
			t.Errorf("got %s, want %s", got, tt.want)
		}
	}
}
