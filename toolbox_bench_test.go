package main

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
)

// Toolbox benchmarks, end to end over real sockets (SQLite; Postgres with
// TEST_DATABASE_URL):
//
//	go test . -run '^$' -bench Toolbox -benchtime 2000x

func benchToolboxBroker(b *testing.B, mutate func(*config.Config)) *broker {
	b.Helper()
	cfg := localConfig(b)
	cfg.LogLevel = slog.LevelError
	mutate(&cfg)
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

// benchWords is a vocabulary of pronounceable made-up words.
func benchWords(n int) []string {
	syl := []string{"ka", "lo", "mi", "ren", "tu", "sor", "vel", "an", "dri", "po", "xe", "bal", "gun", "fi", "tor", "ei"}
	r := rand.New(rand.NewPCG(1, 2))
	seen := map[string]bool{}
	var out []string
	for len(out) < n {
		w := syl[r.IntN(len(syl))] + syl[r.IntN(len(syl))] + syl[r.IntN(len(syl))]
		if !seen[w] && !stopWordLike(w) {
			seen[w] = true
			out = append(out, w)
		}
	}
	return out
}

func stopWordLike(w string) bool { return len(w) < 4 }

// seedMemories inserts n memories of ~12 Zipf-distributed words into a mesh.
func seedMemories(b *testing.B, db *models.DB, meshID, memberID string, words []string, n int) {
	b.Helper()
	r := rand.New(rand.NewPCG(3, 4))
	zipf := rand.NewZipf(r, 1.1, 2, uint64(len(words)-1))
	tags := `'{}'`
	if !db.IsPostgres() {
		tags = `'[]'`
	}
	const batch = 500
	for start := 0; start < n; start += batch {
		var sb strings.Builder
		var args []any
		sb.WriteString(`INSERT INTO ` + db.Table("memory") + ` (id, mesh_id, content, tags, remembered_by, remembered_by_name, remembered_at) VALUES `)
		for i := start; i < min(start+batch, n); i++ {
			if i > start {
				sb.WriteString(", ")
			}
			sb.WriteString(`(?, ?, ?, ` + tags + `, ?, 'bench', ?)`)
			var content []string
			for range 12 {
				content = append(content, words[zipf.Uint64()])
			}
			args = append(args, models.NewID(), meshID, strings.Join(content, " "), memberID, time.Now().UTC())
		}
		if err := db.Exec(sb.String(), args...).Error; err != nil {
			b.Fatal(err)
		}
	}
	if db.IsPostgres() {
		if err := db.Exec(`ANALYZE ` + db.Table("memory")).Error; err != nil {
			b.Fatal(err)
		}
	}
}

func reportLatency(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	pct := func(p float64) float64 { return float64(lat[int(float64(len(lat)-1)*p)].Microseconds()) / 1000 }
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(pct(1), "max-ms")
}

// BenchmarkToolboxRecall10k is one recall (two search words) over a mesh
// holding 10,000 memories, request to answer over a socket.
func BenchmarkToolboxRecall10k(b *testing.B) {
	br := benchToolboxBroker(b, func(c *config.Config) {})
	peers := benchPeers(b, br, 1)
	c := peers[0]
	words := benchWords(2000)
	seedMemories(b, br.db, c.ID.MeshID, c.ID.MemberID, words, 10_000)
	r := rand.New(rand.NewPCG(5, 6))
	zipf := rand.NewZipf(r, 1.1, 2, uint64(len(words)-1))
	ctx := context.Background()
	lat := make([]time.Duration, 0, b.N)
	results := 0
	b.ResetTimer()
	for range b.N {
		q := words[zipf.Uint64()] + " " + words[zipf.Uint64()]
		start := time.Now()
		f, err := c.Request(ctx, map[string]any{"type": "recall", "query": q})
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
		var res struct{ Memories []any }
		_ = f.Decode(&res)
		results += len(res.Memories)
		// The daemon-shaped copy that follows.
		if _, err := nextOfType(ctx, c, "memory_recall_result"); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	reportLatency(b, lat)
	b.ReportMetric(float64(results)/float64(b.N), "results/op")
}

func nextOfType(ctx context.Context, c *client.Client, typ string) (client.Frame, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		f, err := c.Next(ctx)
		if err != nil || f.Type == typ {
			return f, err
		}
	}
}

// BenchmarkToolboxScheduleBurst1000 is 1,000 schedules of one mesh falling
// due in the same second, to a recipient online: the time from that second
// until the recipient has every message.
func BenchmarkToolboxScheduleBurst1000(b *testing.B) {
	const n = 1000
	for range b.N {
		b.StopTimer()
		br := benchToolboxBroker(b, func(c *config.Config) {
			c.Toolbox.MaxSchedules, c.Toolbox.MaxSchedulesPerMember = n, n
		})
		peers := benchPeers(b, br, 2)
		sender, recipient := peers[0], peers[1]
		ctx := context.Background()
		due := time.Now().Add(time.Duration(n)*5*time.Millisecond + 2*time.Second).Truncate(time.Second)
		for i := range n {
			if _, err := sender.Request(ctx, map[string]any{"type": "schedule", "to": recipient.ID.Pubkey(), "message": fmt.Sprintf("burst %d", i), "deliverAt": due.UnixMilli()}); err != nil {
				b.Fatal(err)
			}
		}
		if time.Now().After(due) {
			b.Fatal("seeding took longer than planned")
		}
		b.StartTimer()
		got := 0
		for got < n {
			f, err := nextOfType(ctx, recipient, "push")
			if err != nil {
				b.Fatalf("after %d of %d: %v", got, n, err)
			}
			var p pushEvent
			_ = f.Decode(&p)
			if p.Subtype == "" {
				got++
				_ = recipient.ClientAck(p.MessageID, "")
			}
		}
		elapsed := time.Since(due)
		b.StopTimer()
		b.ReportMetric(float64(elapsed.Milliseconds()), "ms-all-sent")
		if elapsed > 2*time.Second {
			b.Logf("1000 due schedules took %v to send, over the 2 s goal", elapsed)
		}
	}
}
