package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"github.com/claudemesh/meshbroker/client"
)

// restartSummary is what --restart prints.
type restartSummary struct {
	Mode        string  `json:"mode"`
	URL         string  `json:"url"`
	Leases      int     `json:"leases"`
	MeshSize    int     `json:"meshSize"`
	Sessions    bool    `json:"sessions"`
	Signal      string  `json:"signal"`
	StopSec     float64 `json:"stopSeconds"`  // signal -> old broker exited
	StartSec    float64 `json:"startSeconds"` // new broker started -> /health answers (restore included)
	Reattached  int     `json:"reattached"`   // hello_ack carried the original presenceId
	Fresh       int     `json:"fresh"`
	Failed      int     `json:"failed"`
	FirstError  string  `json:"firstError,omitempty"`
	DialToAck   latency `json:"dialToAck"` // each peer's first dial -> its hello_ack
	AllWithinMs float64 `json:"allReattachedMs"`
	WallSec     float64 `json:"wallSeconds"`
}

// runRestart starts the broker binary (--broker-bin, with meshload's own
// environment: DATABASE_URL or DATA_DIR, BROKER_PORT, LEASE_TTL_MS, …),
// connects o.restart peers, stops the broker with --restart-signal (TERM or
// KILL), starts it again on the same storage and, as soon as it answers
// /health, redials every peer at once with its identity, as clients do
// after a redeploy. Each peer's time from its first dial to hello_ack is
// measured; a hello_ack with the original presenceId is a silent reattach.
func runRestart(ctx context.Context, o options, stdout io.Writer, logf func(string, ...any)) error {
	wallStart := time.Now()
	n := o.restart
	sig := syscall.SIGTERM
	if o.restartSignal == "KILL" {
		sig = syscall.SIGKILL
	}
	peers, err := seed(ctx, o, n, o.meshSize, logf)
	if err != nil {
		return err
	}
	healthURL := strings.TrimSuffix(metricsURLFor(o.url), "/metrics") + "/health"
	broker, err := startBrokerProcess(ctx, o.brokerBin, healthURL, logf)
	if err != nil {
		return err
	}
	defer func() { broker.stop(syscall.SIGKILL) }()
	opts := func(i int) client.Options { return peerOptions(peers[i], i, 256) }
	clients, err := connectAll(ctx, o, peers, opts, logf)
	if err != nil {
		return err
	}
	presence := make([]string, n)
	for i, c := range clients {
		presence[i] = c.HelloAck.PresenceID
		go func() {
			for {
				select {
				case <-c.Events():
				case <-c.Done():
					return
				}
			}
		}()
	}
	sleepCtx(ctx, o.settle)

	s := restartSummary{Mode: "restart", URL: o.url, Leases: n, MeshSize: o.meshSize, Sessions: o.sessions, Signal: o.restartSignal}
	logf("stopping the broker with SIG%s", o.restartSignal)
	stopStart := time.Now()
	broker.stop(sig)
	s.StopSec = time.Since(stopStart).Seconds()
	closeAll(clients, true)

	startAt := time.Now()
	broker, err = startBrokerProcess(ctx, o.brokerBin, healthURL, logf)
	if err != nil {
		return err
	}
	s.StartSec = time.Since(startAt).Seconds()
	logf("broker back after %.2f s; %d peers redial at once", s.StartSec, n)

	dialToAck := make([]time.Duration, 0, n)
	conns := make([]*websocket.Conn, n)
	var mu sync.Mutex
	var wg sync.WaitGroup
	first := time.Now()
	var last time.Time
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ws, dial, _, pid, err := rehello(ctx, o, peers[i], opts(i))
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
			dialToAck = append(dialToAck, dial)
			if now := time.Now(); now.After(last) {
				last = now
			}
			if pid == presence[i] {
				s.Reattached++
			} else {
				s.Fresh++
			}
		}()
	}
	wg.Wait()
	s.AllWithinMs = ms(last.Sub(first))
	s.DialToAck = summarize(dialToAck)
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
	fmt.Fprintf(stdout, "meshload --restart: %d peers (%s hello), broker stopped with SIG%s and started again\n", n,
		map[bool]string{true: "session", false: "member"}[o.sessions], o.restartSignal)
	fmt.Fprintf(stdout, "  stop %.2f s, start and restore %.2f s\n", s.StopSec, s.StartSec)
	fmt.Fprintf(stdout, "  result        %d reattached (same presenceId), %d fresh, %d failed", s.Reattached, s.Fresh, s.Failed)
	if s.FirstError != "" {
		fmt.Fprintf(stdout, " (first: %s)", s.FirstError)
	}
	fmt.Fprintln(stdout)
	fmt.Fprintf(stdout, "  dial->hello_ack  %s\n", s.DialToAck)
	fmt.Fprintf(stdout, "  all reattached within %.0f ms of the first dial; wall time %.1f s\n", s.AllWithinMs, s.WallSec)
	return nil
}

// brokerProcess is a broker meshload started.
type brokerProcess struct {
	cmd    *exec.Cmd
	exited chan struct{}
}

// startBrokerProcess runs bin with meshload's environment, its output going
// to meshload's stderr, and waits until healthURL answers.
func startBrokerProcess(ctx context.Context, bin, healthURL string, logf func(string, ...any)) (*brokerProcess, error) {
	cmd := exec.Command(bin)
	cmd.Env = os.Environ()
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start broker %s: %w", bin, err)
	}
	b := &brokerProcess{cmd: cmd, exited: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(b.exited) }()
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-b.exited:
			return nil, fmt.Errorf("broker exited during start")
		default:
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, healthURL, nil)
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				logf("broker pid %d answers %s", cmd.Process.Pid, healthURL)
				return b, nil
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			b.stop(syscall.SIGKILL)
			return nil, fmt.Errorf("broker did not answer %s", healthURL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop signals the process and waits for it to exit.
func (b *brokerProcess) stop(sig syscall.Signal) {
	select {
	case <-b.exited:
		return
	default:
	}
	_ = b.cmd.Process.Signal(sig)
	select {
	case <-b.exited:
	case <-time.After(30 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.exited
	}
}
