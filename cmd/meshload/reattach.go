package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"github.com/claudemesh/meshbroker/client"
)

// reattachSummary is what --reattach prints.
type reattachSummary struct {
	Mode       string  `json:"mode"`
	URL        string  `json:"url"`
	Leases     int     `json:"leases"`
	MeshSize   int     `json:"meshSize"`
	Sessions   bool    `json:"sessions"`
	Batch      int     `json:"batch"`
	BatchGapMs float64 `json:"batchGapMs"`
	InGrace    int64   `json:"inGraceSeen"` // meshbroker_offline_leases before reattaching; -1 unknown
	Reattached int     `json:"reattached"`  // hello_ack carried the original presenceId
	Fresh      int     `json:"fresh"`       // hello_ack with a new presenceId
	Failed     int     `json:"failed"`
	FirstError string  `json:"firstError,omitempty"`
	OpenToAck  latency `json:"openToAck"` // socket open (upgrade done) -> hello_ack
	DialToAck  latency `json:"dialToAck"` // dial start -> hello_ack
	TotalSec   float64 `json:"reattachSeconds"`
	WallSec    float64 `json:"wallSeconds"`
}

// runReattach connects o.reattach peers, drops every socket without a close
// frame so each presence enters its grace window, then reconnects each with
// the same identity and session (id or key) and times socket open →
// hello_ack. A hello_ack with the original presenceId is a reattach.
func runReattach(ctx context.Context, o options, stdout io.Writer, logf func(string, ...any)) error {
	wallStart := time.Now()
	n := o.reattach
	peers, err := seed(ctx, o, n, o.meshSize, logf)
	if err != nil {
		return err
	}
	opts := func(i int) client.Options { return peerOptions(peers[i], i, 256) }
	clients, err := connectAll(ctx, o, peers, opts, logf)
	if err != nil {
		return err
	}
	presence := make([]string, n)
	for i, c := range clients {
		presence[i] = c.HelloAck.PresenceID
	}
	// Drain join announcements while we wait.
	stopDrain := make(chan struct{})
	for _, c := range clients {
		go func() {
			for {
				select {
				case <-c.Events():
				case <-c.Done():
					return
				case <-stopDrain:
					return
				}
			}
		}()
	}
	metricsURL := o.metricsURL
	if metricsURL == "" {
		metricsURL = metricsURLFor(o.url)
	}
	hc := &http.Client{Timeout: 2 * time.Second}
	graceBefore := offlineLeases(ctx, hc, metricsURL)
	sleepCtx(ctx, o.settle)
	close(stopDrain)
	logf("dropping %d sockets without a close frame", n)
	closeAll(clients, true)

	// Wait until the broker has seen every drop (its offline-lease gauge),
	// or a fixed pause on a broker without that gauge.
	inGrace := int64(-1)
	if graceBefore >= 0 {
		deadline := time.Now().Add(15 * time.Second)
		for time.Now().Before(deadline) && ctx.Err() == nil {
			if v := offlineLeases(ctx, hc, metricsURL); v >= 0 {
				inGrace = v - graceBefore
				if inGrace >= int64(n) {
					break
				}
			}
			sleepCtx(ctx, 50*time.Millisecond)
		}
		logf("broker reports %d new leases in grace", inGrace)
	} else {
		sleepCtx(ctx, o.settle)
	}

	openToAck := make([]time.Duration, 0, n)
	dialToAck := make([]time.Duration, 0, n)
	conns := make([]*websocket.Conn, n)
	var mu sync.Mutex
	s := reattachSummary{Mode: "reattach", URL: o.url, Leases: n, MeshSize: o.meshSize, Sessions: o.sessions, Batch: o.batch,
		BatchGapMs: ms(o.batchGap), InGrace: inGrace}
	started := time.Now()
	for start := 0; start < n; start += o.batch {
		end := min(start+o.batch, n)
		var wg sync.WaitGroup
		for i := start; i < end; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ws, dial, open, pid, err := rehello(ctx, o, peers[i], opts(i))
				mu.Lock()
				defer mu.Unlock()
				conns[i] = ws
				if err != nil {
					s.Failed++
					if s.FirstError == "" {
						s.FirstError = err.Error()
					}
					return
				}
				openToAck = append(openToAck, open)
				dialToAck = append(dialToAck, dial)
				if pid == presence[i] {
					s.Reattached++
				} else {
					s.Fresh++
				}
			}()
		}
		wg.Wait()
		if end < n {
			sleepCtx(ctx, o.batchGap)
		}
		if ctx.Err() != nil {
			break
		}
	}
	s.TotalSec = time.Since(started).Seconds()
	s.OpenToAck, s.DialToAck = summarize(openToAck), summarize(dialToAck)
	for _, ws := range conns {
		if ws != nil {
			_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
			_ = ws.Close()
		}
	}
	s.WallSec = time.Since(wallStart).Seconds()
	if o.json {
		return writeJSON(stdout, s)
	}
	fmt.Fprintf(stdout, "meshload --reattach: %d leases in grace (%s hello), reattached in batches of %d every %s\n", n,
		map[bool]string{true: "session", false: "member"}[o.sessions], o.batch, o.batchGap)
	fmt.Fprintf(stdout, "  in grace      %d (broker gauge; -1 unknown)\n", s.InGrace)
	fmt.Fprintf(stdout, "  result        %d reattached (same presenceId), %d fresh, %d failed", s.Reattached, s.Fresh, s.Failed)
	if s.FirstError != "" {
		fmt.Fprintf(stdout, " (first: %s)", s.FirstError)
	}
	fmt.Fprintln(stdout)
	fmt.Fprintf(stdout, "  open->hello_ack  %s\n", s.OpenToAck)
	fmt.Fprintf(stdout, "  dial->hello_ack  %s\n", s.DialToAck)
	fmt.Fprintf(stdout, "  all reattached in %.2f s; wall time %.1f s\n", s.TotalSec, s.WallSec)
	return nil
}

// rehello dials a raw socket, sends the peer's hello and reads until
// hello_ack. It returns dial→ack and open→ack, and the ack's presenceId.
func rehello(ctx context.Context, o options, p peerIdentity, opts client.Options) (*websocket.Conn, time.Duration, time.Duration, string, error) {
	cctx, cancel := context.WithTimeout(ctx, o.connectTO)
	defer cancel()
	dialStart := time.Now()
	ws, err := client.Dial(cctx, o.url, nil)
	if err != nil {
		return nil, 0, 0, "", err
	}
	opened := time.Now()
	hello, err := json.Marshal(client.BuildHello(p.id, opts))
	if err != nil {
		return ws, 0, 0, "", err
	}
	deadline, _ := cctx.Deadline()
	_ = ws.SetWriteDeadline(deadline)
	_ = ws.SetReadDeadline(deadline)
	if err := ws.WriteMessage(websocket.TextMessage, hello); err != nil {
		return ws, 0, 0, "", fmt.Errorf("send hello: %w", err)
	}
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			return ws, 0, 0, "", fmt.Errorf("wait for hello_ack: %w", err)
		}
		var f struct{ Type, PresenceID, Code, Message string }
		_ = json.Unmarshal(data, &f)
		switch f.Type {
		case "hello_ack":
			now := time.Now()
			// Nothing reads this socket from here on; pushes that follow
			// the ack sit in the kernel buffer until it closes.
			return ws, now.Sub(dialStart), now.Sub(opened), f.PresenceID, nil
		case "error":
			return ws, 0, 0, "", &client.HandshakeError{Code: f.Code, Message: f.Message}
		}
	}
}

// offlineLeases reads meshbroker_offline_leases, or -1.
func offlineLeases(ctx context.Context, hc *http.Client, url string) int64 {
	if url == "" {
		return -1
	}
	v, err := scrapeMetrics(ctx, hc, url, "meshbroker_offline_leases")
	if err != nil {
		return -1
	}
	if x, ok := v["meshbroker_offline_leases"]; ok {
		return int64(x)
	}
	return -1
}
