package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/claudemesh/meshbroker/client"
)

// idleSummary is what --idle prints.
type idleSummary struct {
	Mode         string   `json:"mode"`
	URL          string   `json:"url"`
	Connections  int      `json:"connections"`
	Meshes       int      `json:"meshes"`
	MeshSize     int      `json:"meshSize"`
	Sessions     bool     `json:"sessions"`
	ConnectSec   float64  `json:"connectSeconds"`
	HoldSec      float64  `json:"holdSeconds"`
	AliveAtEnd   int      `json:"aliveAtEnd"`
	SystemPushes int64    `json:"systemPushes"`
	RSSBefore    int64    `json:"rssBeforeBytes"`
	RSSHeld      int64    `json:"rssHeldBytes"` // mean over the hold
	PerConnBytes float64  `json:"perConnectionBytes"`
	RSS          rssStats `json:"brokerRss"`
	WallSec      float64  `json:"wallSeconds"`
}

// runIdle opens o.idle authenticated sockets (meshes of --mesh-size
// members), holds them for --hold while sampling the broker's RSS, and
// reports RSS per connection: (mean RSS during the hold - RSS before the
// first socket) / connections.
func runIdle(ctx context.Context, o options, stdout io.Writer, logf func(string, ...any)) error {
	wallStart := time.Now()
	n := o.idle
	sampler := newRSSSampler(o)
	if !sampler.enabled() {
		logf("warning: no --broker-pid or --metrics-url: RSS per connection cannot be measured")
	}
	peers, err := seed(ctx, o, n, o.meshSize, logf)
	if err != nil {
		return err
	}
	sctx, stopSampler := context.WithCancel(context.Background())
	samplerDone := make(chan struct{})
	go func() { defer close(samplerDone); sampler.run(sctx) }()
	defer func() { stopSampler(); <-samplerDone }()

	logf("settling %s before the baseline", o.settle)
	sleepCtx(ctx, o.settle)
	before := sampler.latest()

	connStart := time.Now()
	clients, err := connectAll(ctx, o, peers, func(i int) client.Options { return peerOptions(peers[i], i, 256) }, logf)
	if err != nil {
		return err
	}
	connectSec := time.Since(connStart).Seconds()
	// Every socket gets its mesh's peer_joined pushes: drain them, or the
	// client's reader stops answering pings.
	var system atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-c.Events():
					system.Add(1)
				case <-c.Done():
					return
				case <-stop:
					return
				}
			}
		}()
	}
	logf("%d sockets open in %.1f s; settling %s, then holding %s", n, connectSec, o.settle, o.hold)
	sleepCtx(ctx, o.settle)
	holdStart := time.Now()
	sleepCtx(ctx, o.hold)
	holdSec := time.Since(holdStart).Seconds()
	held := sampler.meanSince(holdStart)
	alive := 0
	for _, c := range clients {
		select {
		case <-c.Done():
		default:
			alive++
		}
	}
	close(stop)
	wg.Wait()
	st := sampler.stats()
	logf("closing %d sockets", n)
	closeAll(clients, false)

	s := idleSummary{
		Mode: "idle", URL: o.url, Connections: n, Meshes: (n + o.meshSize - 1) / o.meshSize, MeshSize: o.meshSize, Sessions: o.sessions,
		ConnectSec: connectSec, HoldSec: holdSec, AliveAtEnd: alive, SystemPushes: system.Load(),
		RSSBefore: before, RSSHeld: held, RSS: st, WallSec: time.Since(wallStart).Seconds(),
	}
	if before > 0 && held > 0 {
		s.PerConnBytes = float64(held-before) / float64(n)
	}
	if o.json {
		return writeJSON(stdout, s)
	}
	fmt.Fprintf(stdout, "meshload --idle: %d authenticated idle sockets (%d meshes of %d, %s hello)\n", n, s.Meshes, o.meshSize,
		map[bool]string{true: "session", false: "member"}[o.sessions])
	fmt.Fprintf(stdout, "  connected     in %.1f s; alive after %.0f s hold: %d/%d; system pushes received %d\n", connectSec, holdSec, alive, n, s.SystemPushes)
	if st.Samples > 0 {
		fds := "n/a"
		if st.PeakFDs >= 0 {
			fds = strconv.FormatInt(st.PeakFDs, 10)
		}
		fmt.Fprintf(stdout, "  broker RSS    before %s, held (mean) %s, peak %s; peak fds %s\n", mb(before), mb(held), mb(st.Peak), fds)
		fmt.Fprintf(stdout, "  per connection  %.1f KB\n", s.PerConnBytes/1024)
	}
	fmt.Fprintf(stdout, "  wall time     %.1f s\n", s.WallSec)
	return nil
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
}
