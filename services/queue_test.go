package services

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// 02 §12 scenario 6 at the database level: concurrent drains take disjoint
// sets whose union is everything, one drain keeps insert order, a second
// drain after the first finds nothing, and rows of another mesh or another
// key never drain.
func TestClaimsAreDisjoint(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	ctx := context.Background()
	prov := NewProvisionService(db, time.Now)
	mesh, err := prov.CreateMesh(ctx, "q", "", "a")
	if err != nil {
		t.Fatal(err)
	}
	other, err := prov.CreateMesh(ctx, "other", "", "x")
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	q := NewQueueService(cfg, db, slog.New(slog.NewTextHandler(io.Discard, nil)), NewMetrics(), time.Now)
	q.Start()
	defer q.Stop()
	insert := func(meshID, sender, target string, n int) []string {
		var ids []string
		base := time.Now()
		for i := range n {
			r := &QueueRow{ID: models.NewID(), MeshID: meshID, SenderMemberID: sender, TargetSpec: target,
				Priority: "now", CreatedAt: base.Add(time.Duration(i) * time.Millisecond)}
			if err := q.Insert(ctx, r); err != nil {
				t.Fatal(err)
			}
			ids = append(ids, r.ID)
		}
		return ids
	}
	pk := "pkpk" + mesh.Pubkey[4:]
	claim := func(meshID, claimer string) []ClaimedRow {
		rows, err := q.Claim(ctx, ClaimRequest{MeshID: meshID, Targets: []string{pk}, Priorities: []string{"now", "next", "low"}, Claimer: claimer, Limit: 100})
		if err != nil {
			t.Error(err)
		}
		return rows
	}
	for _, tc := range []struct{ rows, drains int }{{10, 2}, {20, 6}} {
		want := insert(mesh.MeshID, mesh.MemberID, pk, tc.rows)
		insert(other.MeshID, other.MemberID, pk, 3)          // same key, another mesh
		insert(mesh.MeshID, mesh.MemberID, "zzzz"+pk[4:], 3) // another key
		var mu sync.Mutex
		seen := map[string]int{}
		var wg sync.WaitGroup
		for d := range tc.drains {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rows := claim(mesh.MeshID, fmt.Sprint("drain-", d))
				got := make([]string, len(rows))
				for i, r := range rows {
					got[i] = r.ID
				}
				if !slices.IsSortedFunc(rows, func(a, b ClaimedRow) int { return a.CreatedAt.Compare(b.CreatedAt) }) {
					t.Errorf("drain %d out of order: %v", d, got)
				}
				mu.Lock()
				for _, id := range got {
					seen[id]++
				}
				mu.Unlock()
			}()
		}
		wg.Wait()
		if len(seen) != len(want) {
			t.Fatalf("%d rows claimed, want %d", len(seen), len(want))
		}
		for _, id := range want {
			if seen[id] != 1 {
				t.Fatalf("row %s claimed %d times", id, seen[id])
			}
		}
		if again := claim(mesh.MeshID, "late"); len(again) != 0 {
			t.Fatalf("second drain got %d rows", len(again))
		}
		if n, _ := q.MarkDelivered(ctx, want); n != int64(len(want)) {
			t.Fatalf("marked %d", n)
		}
	}
}

// Marks without a waiter linger for DeliveredFlush and commit as one batch;
// FlushMarks returns only once every mark queued before it is committed.
func TestAsyncMarksCommitByFlush(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	ctx := context.Background()
	mesh, err := NewProvisionService(db, time.Now).CreateMesh(ctx, "marks", "", "a")
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.DeliveredFlush = time.Hour // only FlushMarks (or a waiter) commits
	q := NewQueueService(cfg, db, slog.New(slog.NewTextHandler(io.Discard, nil)), NewMetrics(), time.Now)
	q.Start()
	defer q.Stop()
	var ids []string
	for i := range 50 {
		r := &QueueRow{ID: models.NewID(), MeshID: mesh.MeshID, SenderMemberID: mesh.MemberID, TargetSpec: mesh.Pubkey, Priority: "now",
			CreatedAt: time.Now().Add(time.Duration(i) * time.Millisecond)}
		if err := q.Insert(ctx, r); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.ID)
	}
	for _, id := range ids {
		q.MarkDeliveredAsync(id)
	}
	if err := q.FlushMarks(ctx); err != nil {
		t.Fatal(err)
	}
	var open int64
	if err := db.Raw("SELECT count(*) FROM "+db.Table("message_queue")+" WHERE mesh_id = ? AND delivered_at IS NULL", mesh.MeshID).Scan(&open).Error; err != nil {
		t.Fatal(err)
	}
	if open != 0 {
		t.Fatalf("%d of %d rows still undelivered after FlushMarks", open, len(ids))
	}
}
