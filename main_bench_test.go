package main

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// End-to-end benchmarks: a whole broker started through startBroker (the
// wiring main uses) on 127.0.0.1:0, real sockets, real keys, real
// crypto_box bodies. SQLite by default, Postgres with TEST_DATABASE_URL.
//
//	go test . -run '^$' -bench E2E -benchmem

// benchBroker starts a broker for a benchmark and stops it at cleanup.
func benchStartBroker(b *testing.B) *broker {
	b.Helper()
	cfg := localConfig(b)
	cfg.MaxConnectionsPerMesh = 1000
	cfg.LogLevel = slog.LevelError
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	br, err := startBroker(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatalf("start broker: %v", err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := br.Close(ctx); err != nil {
			b.Errorf("broker close: %v", err)
		}
	})
	return br
}

// benchPeers provisions a mesh with n members and connects each with a
// member hello.
func benchPeers(b *testing.B, br *broker, n int) []*client.Client {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	prov := services.NewProvisionService(br.db, time.Now)
	owner, err := prov.CreateMesh(ctx, "bench", "", "peer0")
	if err != nil {
		b.Fatal(err)
	}
	key, _ := owner.PrivateKey()
	ids := []client.Identity{{MeshID: owner.MeshID, MemberID: owner.MemberID, DisplayName: "peer0", Key: key}}
	for i := 1; i < n; i++ {
		_, k, _ := ed25519.GenerateKey(nil)
		m, err := prov.AddMember(ctx, owner.MeshID, protocol.PubkeyHex(k), fmt.Sprintf("peer%d", i), "member")
		if err != nil {
			b.Fatal(err)
		}
		ids = append(ids, client.Identity{MeshID: owner.MeshID, MemberID: m.MemberID, DisplayName: m.DisplayName, Key: k})
	}
	url := fmt.Sprintf("ws://127.0.0.1:%d/ws", br.Port())
	clients := make([]*client.Client, n)
	for i, id := range ids {
		c, err := client.Connect(ctx, url, id, client.Options{Cwd: "/bench", SessionID: fmt.Sprintf("bench-%d", i)})
		if err != nil {
			b.Fatalf("connect %d: %v", i, err)
		}
		b.Cleanup(c.Kill)
		clients[i] = c
	}
	// Let the join announcements land, then drop them.
	time.Sleep(100 * time.Millisecond)
	for _, c := range clients {
		benchDiscard(c)
	}
	return clients
}

func benchDiscard(c *client.Client) {
	for {
		select {
		case <-c.Events():
		default:
			return
		}
	}
}

// benchNextPush waits for the next message push (system pushes skipped)
// and returns its messageId.
func benchNextPush(b *testing.B, c *client.Client) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		f, err := c.Next(ctx)
		if err != nil {
			b.Fatalf("waiting for a push: %v", err)
		}
		if f.Type != "push" {
			continue
		}
		var p struct{ MessageID, Subtype string }
		if err := json.Unmarshal(f.Raw, &p); err != nil {
			b.Fatal(err)
		}
		if p.Subtype == "" {
			return p.MessageID
		}
	}
}

// BenchmarkE2EDirect is one DM over real sockets: send, ack, push to the
// recipient — the load tool's e2e latency with nothing else in flight.
func BenchmarkE2EDirect(b *testing.B) {
	br := benchStartBroker(b)
	peers := benchPeers(b, br, 2)
	a, r := peers[0], peers[1]
	nonce, ct, err := client.Seal([]byte("benchmark message body of a typical length, about a hundred bytes long....."), r.ID.Key.Public().(ed25519.PublicKey), a.ID.Key)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		ack, err := a.Send(ctx, client.SendRequest{TargetSpec: r.ID.Pubkey(), Priority: "now", Nonce: nonce, Ciphertext: ct})
		if err != nil || !ack.Queued {
			b.Fatalf("send: %v %+v", err, ack)
		}
		if got := benchNextPush(b, r); got != ack.MessageID {
			b.Fatalf("pushed %s, acked %s", got, ack.MessageID)
		}
	}
}

// BenchmarkE2EBroadcast50 is one `*` send reaching 50 connected peers over
// real sockets: the op ends when the last of them has the push.
func BenchmarkE2EBroadcast50(b *testing.B) {
	br := benchStartBroker(b)
	peers := benchPeers(b, br, 51)
	a := peers[0]
	nonce, ct, err := client.Seal([]byte("broadcast body"), a.ID.Key.Public().(ed25519.PublicKey), a.ID.Key)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		ack, err := a.Send(ctx, client.SendRequest{TargetSpec: "*", Priority: "now", Nonce: nonce, Ciphertext: ct})
		if err != nil || !ack.Queued {
			b.Fatalf("send: %v %+v", err, ack)
		}
		for _, r := range peers[1:] {
			if got := benchNextPush(b, r); got != ack.MessageID {
				b.Fatalf("pushed %s, acked %s", got, ack.MessageID)
			}
		}
	}
}
