package services

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"log/slog"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
	"github.com/claudemesh/meshbroker/protocol"
)

// Benchmarks of the messaging hot paths against a real database: SQLite in
// a temp dir, or Postgres with TEST_DATABASE_URL set. They wire the
// services as main.go's newBroker does and register peers through the real
// Hello with signed frames; a benchOutbox stands in for the socket.
//
//	go test ./services -run '^$' -bench . -benchmem
//	TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test?sslmode=disable go test ./services -run '^$' -bench . -benchmem

// benchOutbox counts the frames offered to one fake socket.
type benchOutbox struct {
	frames atomic.Int64
	bytes  atomic.Int64
}

func (o *benchOutbox) Offer(f protocol.Frame) bool {
	o.frames.Add(1)
	o.bytes.Add(int64(len(f)))
	return true
}
func (o *benchOutbox) Close(protocol.Close) {}
func (o *benchOutbox) Terminate()           {}
func (o *benchOutbox) Unsent() []string     { return nil }

// benchBroker is the services of one broker without the edge.
type benchBroker struct {
	db        *models.DB
	cfg       config.Config
	presence  *PresenceService
	messaging *MessagingService
	queue     *QueueService
	meshID    string
	peers     []*benchPeer
}

type benchPeer struct {
	id   client.Identity
	conn *Conn
	out  *benchOutbox
}

func newBenchBroker(b *testing.B, peers int) *benchBroker {
	b.Helper()
	db := modelstest.OpenTestDB(b)
	cfg := config.Default()
	cfg.SendRatePerMin = 0
	cfg.MaxConnectionsPerMesh = peers + 1
	log := slog.New(slog.DiscardHandler)
	now := time.Now
	metrics := NewMetrics()
	audit := NewAuditService(db, log, metrics, now)
	members := NewMemberDirectory(db, now, cfg.MemberCacheTTL)
	status := NewStatusService(cfg, db, log, metrics, now)
	resumeKey, err := LoadResumeKey(context.Background(), db, cfg.ResumeTokenKey)
	if err != nil {
		b.Fatal(err)
	}
	presence := NewPresenceService(cfg, db, log, metrics, members, status, audit, NewResumeTokens(resumeKey, cfg.MaxAttestTTL, now), now)
	queue := NewQueueService(cfg, db, log, metrics, now)
	messaging := NewMessagingService(cfg, log, metrics, now, presence, queue, status, members, audit)
	audit.Start()
	queue.Start()
	b.Cleanup(func() {
		queue.Stop()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = audit.Close(ctx)
	})
	bb := &benchBroker{db: db, cfg: cfg, presence: presence, messaging: messaging, queue: queue}
	ctx := context.Background()
	prov := NewProvisionService(db, now)
	owner, err := prov.CreateMesh(ctx, "bench", "", "peer0")
	if err != nil {
		b.Fatal(err)
	}
	bb.meshID = owner.MeshID
	key, _ := owner.PrivateKey()
	ids := []client.Identity{{MeshID: owner.MeshID, MemberID: owner.MemberID, DisplayName: "peer0", Key: key}}
	for i := 1; i < peers; i++ {
		_, k, _ := ed25519.GenerateKey(nil)
		m, err := prov.AddMember(ctx, owner.MeshID, protocol.PubkeyHex(k), fmt.Sprintf("peer%d", i), "member")
		if err != nil {
			b.Fatal(err)
		}
		ids = append(ids, client.Identity{MeshID: owner.MeshID, MemberID: m.MemberID, DisplayName: m.DisplayName, Key: k})
	}
	for i, id := range ids {
		raw, err := json.Marshal(client.BuildHello(id, client.Options{SessionID: fmt.Sprintf("bench-%d", i), Cwd: "/bench"}))
		if err != nil {
			b.Fatal(err)
		}
		var h protocol.Hello
		if err := protocol.Decode(raw, &h); err != nil {
			b.Fatal(err)
		}
		out := &benchOutbox{}
		c, err := presence.Hello(ctx, out, &h)
		if err != nil {
			b.Fatalf("hello %d: %v", i, err)
		}
		bb.peers = append(bb.peers, &benchPeer{id: id, conn: c, out: out})
	}
	// Let the attach drains of the hellos finish before measuring.
	time.Sleep(50 * time.Millisecond)
	return bb
}

// sealed is a real crypto_box body from one peer to another.
func sealed(b *testing.B, from, to *benchPeer) (nonce, ct string) {
	b.Helper()
	n, c, err := client.Seal([]byte("benchmark message body of a typical length, about a hundred bytes long....."), to.id.Key.Public().(ed25519.PublicKey), from.id.Key)
	if err != nil {
		b.Fatal(err)
	}
	return n, c
}

// send runs one accepted send and fails the benchmark on anything but an ack.
func (bb *benchBroker) send(b *testing.B, from *benchPeer, req SendRequest) {
	var ack protocol.Ack
	if err := bb.messaging.Send(context.Background(), from.conn, req, func(a protocol.Ack) { ack = a }); err != nil {
		b.Fatal(err)
	}
	if !ack.Queued {
		b.Fatalf("send rejected: %q", ack.Error)
	}
}

// BenchmarkAcceptDirect is one direct send from a sender to an idle online
// recipient: validation, grants, the group-committed INSERT, the ack and
// the push straight after the commit (02 §1.2). It runs the whole path the
// edge runs for a send frame, minus the socket.
func BenchmarkAcceptDirect(b *testing.B) {
	bb := newBenchBroker(b, 2)
	a, r := bb.peers[0], bb.peers[1]
	nonce, ct := sealed(b, a, r)
	req := SendRequest{ID: "x", TargetSpec: r.id.Pubkey(), Priority: "now", Nonce: nonce, Ciphertext: ct}
	b.ReportAllocs()
	start := r.out.frames.Load()
	for b.Loop() {
		bb.send(b, a, req)
	}
	if got := r.out.frames.Load() - start; got < int64(b.N) {
		b.Fatalf("pushed %d of %d", got, b.N)
	}
}

// BenchmarkAcceptDirectParallel is the accept path under concurrency: 100
// connections each sending DMs to random others, as in the load test. The
// group commit should make ns/op far smaller than the serial case.
func BenchmarkAcceptDirectParallel(b *testing.B) {
	const peers = 100
	bb := newBenchBroker(b, peers)
	var next atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.SetParallelism((peers + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0)) // about one goroutine per connection
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1)-1) % peers
		from := bb.peers[i]
		to := bb.peers[(i+1)%peers]
		nonce, ct := sealed(b, from, to)
		req := SendRequest{ID: "x", TargetSpec: to.id.Pubkey(), Priority: "now", Nonce: nonce, Ciphertext: ct}
		for pb.Next() {
			bb.send(b, from, req)
		}
	})
}

// BenchmarkDrain claims and pushes a backlog of 100 queued rows for one
// connection (claim query, status gate, sender keys, encode, offer): the
// path a reattach or a backlogged recipient takes. The pushed rows are
// marked delivered between iterations, as a client_ack would. The
// sub-benchmarks add undelivered rows for other recipients of the mesh
// (pushed, not yet acked: every non-acking client leaves them for the claim
// lease), which the claim has to step over.
func BenchmarkDrain(b *testing.B) {
	for _, noise := range []int{0, 10000} {
		b.Run(fmt.Sprintf("undelivered=%d", noise), func(b *testing.B) {
			const backlog = 100
			bb := newBenchBroker(b, 2)
			a, r := bb.peers[0], bb.peers[1]
			nonce, ct := sealed(b, a, r)
			ctx := context.Background()
			bb.insertNoise(b, a, noise, nonce, ct)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				ids := bb.insertBacklog(b, a, r.id.Pubkey(), backlog, nonce, ct)
				want := r.out.frames.Load() + backlog
				b.StartTimer()
				bb.messaging.TriggerDrain(r.conn.PresenceID)
				deadline := time.Now().Add(30 * time.Second)
				for r.out.frames.Load() < want {
					if time.Now().After(deadline) {
						b.Fatalf("drain pushed %d of %d", r.out.frames.Load()-want+backlog, backlog)
					}
					time.Sleep(20 * time.Microsecond)
				}
				b.StopTimer()
				if _, err := bb.queue.MarkDelivered(ctx, ids); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*backlog), "ns/row")
		})
	}
}

// BenchmarkClaim is the claim statement alone: take 100 eligible rows, with
// and without 10,000 undelivered rows of other recipients in the mesh.
func BenchmarkClaim(b *testing.B) {
	for _, noise := range []int{0, 10000} {
		b.Run(fmt.Sprintf("undelivered=%d", noise), func(b *testing.B) {
			const backlog = 100
			bb := newBenchBroker(b, 2)
			a, r := bb.peers[0], bb.peers[1]
			nonce, ct := sealed(b, a, r)
			ctx := context.Background()
			target := "f0" + r.id.Pubkey()[2:] // nobody's key: only this benchmark claims it
			bb.insertNoise(b, a, noise, nonce, ct)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				ids := bb.insertBacklog(b, a, target, backlog, nonce, ct)
				b.StartTimer()
				rows, err := bb.queue.Claim(ctx, ClaimRequest{MeshID: bb.meshID, Targets: []string{target},
					Priorities: []string{"now", "next", "low"}, Claimer: "bench", Limit: 256})
				if err != nil {
					b.Fatal(err)
				}
				if len(rows) != backlog {
					b.Fatalf("claimed %d of %d", len(rows), backlog)
				}
				b.StopTimer()
				if _, err := bb.queue.MarkDelivered(ctx, ids); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// BenchmarkInsertBatch is one group commit: a multi-row INSERT of 1, 32 or
// 256 queue rows, the statement every accepted send waits for.
func BenchmarkInsertBatch(b *testing.B) {
	for _, n := range []int{1, 32, 256} {
		b.Run(fmt.Sprintf("rows=%d", n), func(b *testing.B) {
			bb := newBenchBroker(b, 2)
			a, r := bb.peers[0], bb.peers[1]
			nonce, ct := sealed(b, a, r)
			b.ReportAllocs()
			for b.Loop() {
				bb.insertBacklog(b, a, r.id.Pubkey()+"x", n, nonce, ct)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/row")
		})
	}
}

// insertBacklog stores n unclaimed rows for target and returns their ids.
func (bb *benchBroker) insertBacklog(b *testing.B, from *benchPeer, target string, n int, nonce, ct string) []string {
	b.Helper()
	batch := make([]*insertReq, 0, n)
	ids := make([]string, 0, n)
	for range n {
		row := &QueueRow{ID: models.NewID(), MeshID: bb.meshID, SenderMemberID: from.conn.MemberID, TargetSpec: target,
			Priority: "now", Nonce: nonce, Ciphertext: ct, CreatedAt: time.Now()}
		batch = append(batch, &insertReq{row: row})
		ids = append(ids, row.ID)
	}
	if err := bb.queue.insertRows(context.Background(), batch); err != nil {
		b.Fatal(err)
	}
	return ids
}

// insertNoise stores n undelivered rows for other keys of the mesh, claimed
// by another connection for the next 30 s: what a run of non-acking
// clients leaves behind.
func (bb *benchBroker) insertNoise(b *testing.B, from *benchPeer, n int, nonce, ct string) {
	b.Helper()
	claimer := "other-presence"
	for done := 0; done < n; {
		batch := make([]*insertReq, 0, maxInsertBatch)
		for ; done < n && len(batch) < maxInsertBatch; done++ {
			now := time.Now()
			exp := now.Add(30 * time.Second)
			_, k, _ := ed25519.GenerateKey(nil)
			batch = append(batch, &insertReq{row: &QueueRow{ID: models.NewID(), MeshID: bb.meshID, SenderMemberID: from.conn.MemberID,
				TargetSpec: protocol.PubkeyHex(k), Priority: "now", Nonce: nonce, Ciphertext: ct, CreatedAt: now,
				ClaimedAt: &now, ClaimID: &claimer, ClaimExpiresAt: &exp}})
		}
		if err := bb.queue.insertRows(context.Background(), batch); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMemberByID is the member lookup the push path makes for every
// row whose sender has no session key (senderKeys).
func BenchmarkMemberByID(b *testing.B) {
	bb := newBenchBroker(b, 2)
	members := NewMemberDirectory(bb.db, time.Now, bb.cfg.MemberCacheTTL)
	id := bb.peers[0].conn.MemberID
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if m, err := members.ByID(ctx, id); err != nil || m == nil {
			b.Fatal(m, err)
		}
	}
}

// BenchmarkFanoutBroadcast50 is one `*` send reaching 50 online peers: the
// stored-as-delivered INSERT, the ack, one encode and 50 offers.
func BenchmarkFanoutBroadcast50(b *testing.B) {
	bb := newBenchBroker(b, 51)
	a := bb.peers[0]
	nonce, ct := sealed(b, a, bb.peers[1])
	req := SendRequest{ID: "x", TargetSpec: "*", Priority: "now", Nonce: nonce, Ciphertext: ct}
	before := make([]int64, len(bb.peers))
	for i, p := range bb.peers {
		before[i] = p.out.frames.Load()
	}
	b.ReportAllocs()
	for b.Loop() {
		bb.send(b, a, req)
	}
	for i, p := range bb.peers[1:] {
		if got := p.out.frames.Load() - before[i+1]; got < int64(b.N) {
			b.Fatalf("peer %d got %d of %d broadcasts", i+1, got, b.N)
		}
	}
}
