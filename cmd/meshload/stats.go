package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/claudemesh/meshbroker/client"
)

// latency is a distribution summary in milliseconds.
type latency struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50Ms"`
	P95 float64 `json:"p95Ms"`
	P99 float64 `json:"p99Ms"`
	Max float64 `json:"maxMs"`
}

// summarize sorts d in place and takes nearest-rank percentiles.
func summarize(d []time.Duration) latency {
	if len(d) == 0 {
		return latency{}
	}
	slices.Sort(d)
	at := func(p float64) float64 {
		i := int(p*float64(len(d))+0.999999) - 1
		i = min(max(i, 0), len(d)-1)
		return ms(d[i])
	}
	return latency{N: len(d), P50: at(0.50), P95: at(0.95), P99: at(0.99), Max: ms(d[len(d)-1])}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func (l latency) String() string {
	if l.N == 0 {
		return "n=0"
	}
	return fmt.Sprintf("p50 %s  p95 %s  p99 %s  max %s  (n=%d)", fmtMs(l.P50), fmtMs(l.P95), fmtMs(l.P99), fmtMs(l.Max), l.N)
}

func fmtMs(v float64) string {
	switch {
	case v >= 1000:
		return fmt.Sprintf("%.2f s", v/1000)
	case v >= 10:
		return fmt.Sprintf("%.1f ms", v)
	default:
		return fmt.Sprintf("%.2f ms", v)
	}
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	return enc.Encode(v)
}

// connectAll opens one client per peer in batches of o.batch, the batch's
// sockets in parallel, o.batchGap between batches (the reference's 20 and
// 50 ms). It fails on the first socket that cannot connect, closing the rest.
func connectAll(ctx context.Context, o options, peers []peerIdentity, opts func(i int) client.Options, logf func(string, ...any)) ([]*client.Client, error) {
	clients := make([]*client.Client, len(peers))
	started := time.Now()
	var firstErr error
	for start := 0; start < len(peers); start += o.batch {
		end := min(start+o.batch, len(peers))
		var wg sync.WaitGroup
		var mu sync.Mutex
		for i := start; i < end; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cctx, cancel := context.WithTimeout(ctx, o.connectTO)
				defer cancel()
				c, err := client.Connect(cctx, o.url, peers[i].id, opts(i))
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					if firstErr == nil {
						firstErr = fmt.Errorf("connect %s: %w", peers[i].id.DisplayName, err)
					}
					return
				}
				clients[i] = c
			}()
		}
		wg.Wait()
		if firstErr == nil && ctx.Err() != nil {
			firstErr = ctx.Err()
		}
		if firstErr != nil {
			closeAll(clients, true)
			return nil, firstErr
		}
		if (end/o.batch)%50 == 0 || end == len(peers) {
			logf("connected %d/%d sockets (%s)", end, len(peers), time.Since(started).Round(time.Millisecond))
		}
		if end < len(peers) {
			select {
			case <-time.After(o.batchGap):
			case <-ctx.Done():
			}
		}
	}
	return clients, nil
}

// closeAll closes every client in parallel (kill: drop the TCP connection
// without a close frame).
func closeAll(clients []*client.Client, kill bool) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 512)
	for _, c := range clients {
		if c == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if kill {
				c.Kill()
			} else {
				_ = c.Close()
			}
		}()
	}
	wg.Wait()
}

// peerOptions are the connect options of peer i: a stable session id (a
// member hello reattaches by it), a cwd and display name, and with
// --sessions the peer's session key.
func peerOptions(p peerIdentity, i int, eventBuffer int) client.Options {
	return client.Options{
		Session:     p.session,
		SessionID:   fmt.Sprintf("meshload-%s-%d", p.id.MemberID[:8], i),
		Cwd:         fmt.Sprintf("/meshload/peer%d", i),
		DisplayName: p.id.DisplayName,
		Pid:         100000 + i,
		EventBuffer: eventBuffer,
	}
}

// metricsURLFor guesses the broker's /metrics from its ws URL.
func metricsURLFor(wsURL string) string {
	u, err := url.Parse(wsURL)
	if err != nil {
		return ""
	}
	switch u.Scheme {
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	}
	u.Path = "/metrics"
	u.RawQuery = ""
	return u.String()
}

func pct(n, of int64) float64 {
	if of == 0 {
		return 100
	}
	return 100 * float64(n) / float64(of)
}
