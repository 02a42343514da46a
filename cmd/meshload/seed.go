package main

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// peerIdentity is one seeded member: its identity and, with --sessions, the
// session key it connects with.
type peerIdentity struct {
	id      client.Identity
	session *client.Session
}

// routingKey is the key other peers address this peer by.
func (p peerIdentity) routingKey() string {
	if p.session != nil {
		return p.session.Pubkey()
	}
	return p.id.Pubkey()
}

// boxKey is the ed25519 key whose X25519 form opens envelopes sent to
// routingKey (the session key for session peers, as real clients do).
func (p peerIdentity) boxKey() ed25519.PrivateKey {
	if p.session != nil {
		return p.session.Key
	}
	return p.id.Key
}

// seedWorkers bounds concurrent AddMember transactions: enough to hide the
// round trips, few enough to leave the pool to a running broker.
const seedWorkers = 8

// seed opens the broker's database, creates ceil(n/meshSize) meshes and
// fills them with n members in total, each with a fresh ed25519 key. The
// mesh owner is the first member of each mesh. It runs before any socket
// opens: provisioning must not race the run.
func seed(ctx context.Context, o options, n, meshSize int, logf func(string, ...any)) ([]peerIdentity, error) {
	started := time.Now()
	db, err := models.Open(ctx, o.databaseURL, o.dataDir, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	defer db.Close()
	if err := db.Bootstrap(ctx); err != nil {
		return nil, fmt.Errorf("bootstrap schema: %w", err)
	}
	prov := services.NewProvisionService(db, time.Now)
	peers := make([]peerIdentity, n)
	run := models.NewID()[:6]
	type job struct{ idx int }
	jobs := make(chan job)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
	}
	owners := map[int]client.Identity{}
	for start := 0; start < n; start += meshSize {
		owner, err := prov.CreateMesh(ctx, fmt.Sprintf("meshload-%s-%d", run, start/meshSize), "", fmt.Sprintf("peer%d", start))
		if err != nil {
			return nil, err
		}
		key, err := owner.PrivateKey()
		if err != nil {
			return nil, err
		}
		id := client.Identity{MeshID: owner.MeshID, MemberID: owner.MemberID, DisplayName: owner.DisplayName, Key: key}
		owners[start/meshSize] = id
		peers[start] = peerIdentity{id: id}
	}
	for range seedWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				owner := owners[j.idx/meshSize]
				_, key, _ := ed25519.GenerateKey(nil)
				name := fmt.Sprintf("peer%d", j.idx)
				m, err := prov.AddMember(ctx, owner.MeshID, protocol.PubkeyHex(key), name, "member")
				if err != nil {
					fail(fmt.Errorf("add member %s: %w", name, err))
					continue
				}
				peers[j.idx] = peerIdentity{id: client.Identity{MeshID: owner.MeshID, MemberID: m.MemberID, DisplayName: name, Key: key}}
			}
		}()
	}
	for i := range n {
		if i%meshSize == 0 {
			continue
		}
		select {
		case jobs <- job{i}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(jobs)
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if o.sessions {
		for i := range peers {
			s := client.NewSession()
			peers[i].session = &s
		}
	}
	logf("seeded %d members in %d mesh(es) in %s", n, len(owners), time.Since(started).Round(time.Millisecond))
	return peers, nil
}
