package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/nacl/box"

	"github.com/claudemesh/meshbroker/client"
)

// The message run, in phases: seed, connect, build every send frame (so the
// tool's crypto does not share the CPU with the broker while it is
// measured), send, drain, linger, report.

// sendRec is one message a peer sent. sentAt is written by the peer's sender
// goroutine, the ack fields by its reader goroutine; nothing reads them
// until both have stopped.
type sendRec struct {
	target    int   // recipient peer index; -1 for broadcast
	sentAt    int64 // ns since the run's t0; 0 if never written
	ackAt     int64
	messageID string
	queued    bool
	rejected  string // ack error text, or "error <code>" for an error frame
}

// peerRun is one peer's state during a run.
//
// Concurrency: frames, targets and key material are static after build.
// recs: see sendRec. pushes, dups and samples are owned by the reader
// goroutine until it exits. window is the sender/reader handshake for
// --window.
type peerRun struct {
	idx    int
	c      *client.Client
	frames [][]byte
	recs   []sendRec

	window chan struct{} // nil without --window

	pushes    map[string]int64 // first push time per messageId
	senderKey map[string]string
	dups      int
	dupAfter  []time.Duration // duplicate push time - first push time
	system    int
	samples   []json.RawMessage
	sendErr   error
}

// inFrame is the part of an inbound frame the run looks at.
type inFrame struct {
	Type         string `json:"type"`
	Subtype      string `json:"subtype"`
	ID           string `json:"id"`
	MessageID    string `json:"messageId"`
	Queued       bool   `json:"queued"`
	Error        string `json:"error"`
	Code         string `json:"code"`
	SenderPubkey string `json:"senderPubkey"`
}

// counters are the live totals the drain loop watches.
type counters struct {
	sent, acked, rejected   atomic.Int64
	expected, delivered     atomic.Int64
	duplicates, clientAcks  atomic.Int64
	lastAck, lastPush       atomic.Int64 // ns since t0
	firstSend, lastSendDone atomic.Int64
}

// messageSummary is what a message run prints.
type messageSummary struct {
	Mode           string   `json:"mode"`
	URL            string   `json:"url"`
	Peers          int      `json:"peers"`
	MessagesPer    int      `json:"messagesPerPeer"`
	Priority       string   `json:"priority"`
	Sessions       bool     `json:"sessions"`
	BroadcastShare float64  `json:"broadcastShare"`
	Rate           float64  `json:"rateTarget"`
	Window         int      `json:"window"`
	ClientAck      bool     `json:"clientAck"`
	Sent           int64    `json:"sent"`
	Acked          int64    `json:"acked"`
	Rejected       int64    `json:"rejected"`
	RejectSample   string   `json:"rejectSample,omitempty"`
	Unacked        int64    `json:"unacked"`
	Expected       int64    `json:"expectedDeliveries"`
	Delivered      int64    `json:"delivered"`
	DeliveredPct   float64  `json:"deliveredPct"`
	TimedOut       int64    `json:"timedOut"`
	Duplicates     int64    `json:"duplicates"`
	DupAfter       latency  `json:"duplicateAfterFirstPush"`
	SocketsLost    int      `json:"socketsLost"` // closed by the broker or the network before the run ended
	LostReason     string   `json:"lostReason,omitempty"`
	Misrouted      int64    `json:"misrouted"`
	Unknown        int64    `json:"unknownPushes"`
	DispatchSec    float64  `json:"dispatchSeconds"`
	AcceptedPerSec float64  `json:"acceptedPerSec"`
	DeliverPerSec  float64  `json:"deliveredPerSec"`
	E2E            latency  `json:"e2e"`
	Ack            latency  `json:"sendToAck"`
	Verified       int      `json:"verified"`
	VerifyFailed   int      `json:"verifyFailed"`
	RSS            rssStats `json:"brokerRss"`
	DrainTimedOut  bool     `json:"drainTimedOut"`
	WallSec        float64  `json:"wallSeconds"`
}

func runMessages(ctx context.Context, o options, stdout io.Writer, logf func(string, ...any)) error {
	wallStart := time.Now()
	peers, err := seed(ctx, o, o.peers, o.peers, logf)
	if err != nil {
		return err
	}
	sampler := newRSSSampler(o)
	sctx, stopSampler := context.WithCancel(context.Background())
	samplerDone := make(chan struct{})
	go func() { defer close(samplerDone); sampler.run(sctx) }()
	defer func() { stopSampler(); <-samplerDone }()

	// Generous event buffers: the client's reader must never block on us.
	eventBuf := max(4096, 2*o.messages)
	clients, err := connectAll(ctx, o, peers, func(i int) client.Options { return peerOptions(peers[i], i, eventBuf) }, logf)
	if err != nil {
		return err
	}
	defer closeAll(clients, false)

	runs, err := buildFrames(o, peers, clients)
	if err != nil {
		return err
	}
	logf("built %d send frames with crypto_box bodies", o.peers*o.messages)

	var cnt counters
	t0 := time.Now()
	since := func() int64 { return int64(time.Since(t0)) }
	cnt.firstSend.Store(-1)

	// Readers run until stop is closed after the drain.
	stop := make(chan struct{})
	var readers sync.WaitGroup
	for _, pr := range runs {
		readers.Add(1)
		go func() { defer readers.Done(); pr.read(o, &cnt, since, stop) }()
	}

	logf("sending: %d peers x %d messages (priority %s, rate %s, window %d, broadcast share %.2f)",
		o.peers, o.messages, o.priority, rateString(o.rate), o.window, o.broadcastShare)
	sendCtx, cancelSend := context.WithCancel(ctx)
	defer cancelSend()
	var senders sync.WaitGroup
	for _, pr := range runs {
		senders.Add(1)
		go func() { defer senders.Done(); pr.send(sendCtx, o, &cnt, since) }()
	}
	sendersDone := make(chan struct{})
	go func() { senders.Wait(); close(sendersDone) }()

	// Drain: wait for every send to be answered and every accepted message
	// to arrive, bounded by --drain-timeout after the last send.
	drainTimedOut := false
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var deadline <-chan time.Time
	lastLog := time.Now()
wait:
	for {
		select {
		case <-ctx.Done():
			cancelSend()
			break wait
		case <-sendersDone:
			sendersDone = nil
			cnt.lastSendDone.Store(since())
			deadline = time.After(o.drain)
			logf("all sends written in %s; draining (up to %s)", time.Duration(since()-max(cnt.firstSend.Load(), 0)).Round(time.Millisecond), o.drain)
		case <-deadline:
			drainTimedOut = true
			break wait
		case <-tick.C:
			answered := cnt.acked.Load() + cnt.rejected.Load()
			if sendersDone == nil && answered >= cnt.sent.Load() && cnt.delivered.Load() >= cnt.expected.Load() {
				break wait
			}
			if time.Since(lastLog) >= 5*time.Second {
				lastLog = time.Now()
				logf("progress: sent %d, acked %d, delivered %d/%d, duplicates %d", cnt.sent.Load(), cnt.acked.Load(),
					cnt.delivered.Load(), cnt.expected.Load(), cnt.duplicates.Load())
			}
		}
	}
	if o.linger > 0 && ctx.Err() == nil {
		logf("lingering %s for late duplicates", o.linger)
		select {
		case <-time.After(o.linger):
		case <-ctx.Done():
		}
	}
	lost, reason := lostSockets(clients)
	close(stop)
	readers.Wait()
	sampler.sampleOnce(context.Background())

	s := summarizeRun(o, peers, runs, &cnt)
	s.SocketsLost, s.LostReason = lost, reason
	s.DrainTimedOut = drainTimedOut
	s.RSS = sampler.stats()
	s.WallSec = time.Since(wallStart).Seconds()
	if err := sampler.err(); err != nil && s.RSS.Samples == 0 {
		logf("RSS sampling failed: %v", err)
	}
	if o.json {
		return writeJSON(stdout, s)
	}
	printMessageSummary(stdout, s)
	return nil
}

func rateString(r float64) string {
	if r == 0 {
		return "unpaced"
	}
	return fmt.Sprintf("%.0f/s", r)
}

// buildFrames makes every send frame up front: target choice, a real
// crypto_box body (X25519 shared keys precomputed per sender/recipient pair,
// so the output is crypto_box_easy's), and the JSON frame.
func buildFrames(o options, peers []peerIdentity, clients []*client.Client) ([]*peerRun, error) {
	n := len(peers)
	boxPub := make([][32]byte, n)
	for i, p := range peers {
		pub, err := client.EdPublicToX25519(p.boxKey().Public().(ed25519.PublicKey))
		if err != nil {
			return nil, fmt.Errorf("peer %d key: %w", i, err)
		}
		boxPub[i] = pub
	}
	runs := make([]*peerRun, n)
	var wg sync.WaitGroup
	errs := make([]error, n)
	sem := make(chan struct{}, 4)
	for i := range peers {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			runs[i], errs[i] = buildPeer(o, i, peers, boxPub, clients[i])
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return runs, nil
}

type sendFrame struct {
	Type       string `json:"type"`
	ID         string `json:"id"`
	TargetSpec string `json:"targetSpec"`
	Priority   string `json:"priority,omitempty"`
	Nonce      string `json:"nonce"`
	Ciphertext string `json:"ciphertext"`
}

func buildPeer(o options, i int, peers []peerIdentity, boxPub [][32]byte, c *client.Client) (*peerRun, error) {
	n := len(peers)
	rng := mrand.New(mrand.NewPCG(uint64(o.seed), uint64(i)))
	mine := client.EdPrivateToX25519(peers[i].boxKey())
	shared := map[int]*[32]byte{}
	pr := &peerRun{idx: i, c: c, frames: make([][]byte, o.messages), recs: make([]sendRec, o.messages),
		pushes: make(map[string]int64, o.messages*2), senderKey: map[string]string{}}
	if o.window > 0 {
		pr.window = make(chan struct{}, o.window)
	}
	prio := o.priority
	if prio == "none" {
		prio = ""
	}
	plain := make([]byte, o.bodyBytes)
	for k := range o.messages {
		target := rng.IntN(n - 1)
		if target >= i {
			target++
		}
		spec := peers[target].routingKey()
		if o.broadcastShare > 0 && rng.Float64() < o.broadcastShare {
			// Broadcast bodies are sealed to the sender's own key: nobody
			// can open them, the broker forwards them just the same.
			target, spec = -1, "*"
		}
		key := i
		if target >= 0 {
			key = target
		}
		sk := shared[key]
		if sk == nil {
			sk = new([32]byte)
			peer := boxPub[key]
			box.Precompute(sk, &peer, &mine)
			shared[key] = sk
		}
		fillBody(plain, i, k)
		var nonce [24]byte
		if _, err := rand.Read(nonce[:]); err != nil {
			return nil, err
		}
		sealed := box.SealAfterPrecomputation(nil, plain, &nonce, sk)
		f, err := json.Marshal(sendFrame{Type: "send", ID: "m" + strconv.Itoa(k), TargetSpec: spec, Priority: prio,
			Nonce: base64.StdEncoding.EncodeToString(nonce[:]), Ciphertext: base64.StdEncoding.EncodeToString(sealed)})
		if err != nil {
			return nil, err
		}
		pr.frames[k] = f
		pr.recs[k].target = target
	}
	return pr, nil
}

// fillBody writes a recognisable plaintext: "meshload <peer> <k> " padded.
func fillBody(b []byte, peer, k int) {
	head := fmt.Sprintf("meshload %d %d ", peer, k)
	for j := range b {
		if j < len(head) {
			b[j] = head[j]
		} else {
			b[j] = 'x'
		}
	}
}

// send writes the peer's frames: unpaced with the reference's 1 ms pause
// every 100 sends, or on a schedule that spreads --rate over all peers.
func (pr *peerRun) send(ctx context.Context, o options, cnt *counters, since func() int64) {
	var interval time.Duration
	start := time.Now()
	if o.rate > 0 {
		interval = time.Duration(float64(time.Second) * float64(o.peers) / o.rate)
		// Stagger the peers across one interval so the global rate is smooth.
		start = start.Add(interval * time.Duration(pr.idx) / time.Duration(o.peers))
	}
	for k := range pr.frames {
		if pr.window != nil {
			select {
			case pr.window <- struct{}{}:
			case <-ctx.Done():
				return
			}
		}
		if interval > 0 {
			if d := time.Until(start.Add(interval * time.Duration(k))); d > 0 {
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return
				}
			}
		} else if k > 0 && k%100 == 0 {
			time.Sleep(time.Millisecond)
		}
		if ctx.Err() != nil {
			return
		}
		now := since()
		pr.recs[k].sentAt = now
		cnt.firstSend.CompareAndSwap(-1, now)
		if err := pr.c.WriteRaw(pr.frames[k]); err != nil {
			pr.recs[k].sentAt = 0
			pr.sendErr = err
			return
		}
		cnt.sent.Add(1)
	}
}

// read consumes the peer's inbound frames until stop: acks of its own
// sends (by id "m<k>"), error frames answering them, and pushes.
func (pr *peerRun) read(o options, cnt *counters, since func() int64, stop <-chan struct{}) {
	rng := mrand.New(mrand.NewPCG(uint64(o.seed)^0x9e3779b9, uint64(pr.idx)))
	handle := func(f client.Frame) {
		var in inFrame
		_ = json.Unmarshal(f.Raw, &in)
		now := since()
		switch in.Type {
		case "ack", "error":
			k, ok := sendIndex(in.ID, len(pr.recs))
			if !ok {
				return
			}
			r := &pr.recs[k]
			if r.ackAt != 0 {
				return // a second answer to one send: ignore
			}
			r.ackAt = now
			switch {
			case in.Type == "ack" && in.Queued && in.MessageID != "":
				r.queued, r.messageID = true, in.MessageID
				cnt.acked.Add(1)
				if r.target < 0 {
					cnt.expected.Add(int64(o.peers - 1))
				} else {
					cnt.expected.Add(1)
				}
			case in.Type == "ack":
				r.rejected = in.Error
				cnt.rejected.Add(1)
			default:
				r.rejected = "error " + in.Code
				cnt.rejected.Add(1)
			}
			storeMax(&cnt.lastAck, now)
			if pr.window != nil {
				select {
				case <-pr.window:
				default:
				}
			}
		case "push":
			if in.Subtype != "" {
				pr.system++
				return
			}
			if first, seen := pr.pushes[in.MessageID]; seen {
				pr.dups++
				pr.dupAfter = append(pr.dupAfter, time.Duration(now-first))
				cnt.duplicates.Add(1)
				return
			}
			pr.pushes[in.MessageID] = now
			pr.senderKey[in.MessageID] = in.SenderPubkey
			cnt.delivered.Add(1)
			storeMax(&cnt.lastPush, now)
			if o.verifySample > 0 && rng.Float64() < o.verifySample {
				pr.samples = append(pr.samples, f.Raw)
			}
			if o.ack {
				if err := pr.c.ClientAck(in.MessageID, ""); err == nil {
					cnt.clientAcks.Add(1)
				}
			}
		}
	}
	for {
		select {
		case f := <-pr.c.Events():
			handle(f)
		case <-stop:
			for {
				select {
				case f := <-pr.c.Events():
					handle(f)
				default:
					return
				}
			}
		}
	}
}

// lostSockets counts clients whose connection already ended, and why the
// first one did.
func lostSockets(clients []*client.Client) (int, string) {
	n, reason := 0, ""
	for _, c := range clients {
		select {
		case <-c.Done():
			n++
			if reason == "" {
				if ce := c.CloseError(); ce != nil {
					reason = fmt.Sprintf("close %d %q", ce.Code, ce.Text)
				} else if err := c.Err(); err != nil {
					reason = err.Error()
				}
			}
		default:
		}
	}
	return n, reason
}

func sendIndex(id string, n int) (int, bool) {
	rest, ok := strings.CutPrefix(id, "m")
	if !ok {
		return 0, false
	}
	k, err := strconv.Atoi(rest)
	if err != nil || k < 0 || k >= n {
		return 0, false
	}
	return k, true
}

func storeMax(a *atomic.Int64, v int64) {
	for {
		cur := a.Load()
		if v <= cur || a.CompareAndSwap(cur, v) {
			return
		}
	}
}

type origin struct {
	peer, k int
}

// summarizeRun joins sends, acks and pushes by messageId.
func summarizeRun(o options, peers []peerIdentity, runs []*peerRun, cnt *counters) messageSummary {
	s := messageSummary{
		Mode: "messages", URL: o.url, Peers: o.peers, MessagesPer: o.messages, Priority: o.priority, Sessions: o.sessions,
		BroadcastShare: o.broadcastShare, Rate: o.rate, Window: o.window, ClientAck: o.ack,
		Sent: cnt.sent.Load(), Acked: cnt.acked.Load(), Rejected: cnt.rejected.Load(),
		Expected: cnt.expected.Load(), Delivered: cnt.delivered.Load(), Duplicates: cnt.duplicates.Load(),
	}
	byID := make(map[string]origin, s.Acked)
	var acks []time.Duration
	for _, pr := range runs {
		for k, r := range pr.recs {
			if r.queued {
				byID[r.messageID] = origin{pr.idx, k}
				acks = append(acks, time.Duration(r.ackAt-r.sentAt))
			} else if r.rejected != "" && s.RejectSample == "" {
				s.RejectSample = r.rejected
			}
		}
	}
	s.Unacked = s.Sent - s.Acked - s.Rejected
	e2e := make([]time.Duration, 0, s.Delivered)
	for _, pr := range runs {
		for id, at := range pr.pushes {
			src, ok := byID[id]
			if !ok {
				s.Unknown++ // no ack seen for it (yet): not ours, or its ack was lost
				continue
			}
			r := runs[src.peer].recs[src.k]
			if r.target >= 0 && r.target != pr.idx {
				s.Misrouted++
			}
			e2e = append(e2e, time.Duration(at-r.sentAt))
		}
	}
	// Pushes whose ack never came are not deliveries of accepted messages.
	s.Delivered -= s.Unknown
	s.DeliveredPct = pct(s.Delivered, s.Expected)
	s.TimedOut = max(s.Expected-s.Delivered, 0)
	first := max(cnt.firstSend.Load(), 0)
	s.DispatchSec = time.Duration(cnt.lastSendDone.Load() - first).Seconds()
	if d := time.Duration(cnt.lastAck.Load() - first).Seconds(); d > 0 {
		s.AcceptedPerSec = float64(s.Acked) / d
	}
	if d := time.Duration(cnt.lastPush.Load() - first).Seconds(); d > 0 {
		s.DeliverPerSec = float64(s.Delivered) / d
	}
	var dupAfter []time.Duration
	for _, pr := range runs {
		dupAfter = append(dupAfter, pr.dupAfter...)
	}
	s.DupAfter = summarize(dupAfter)
	s.E2E = summarize(e2e)
	s.Ack = summarize(acks)
	s.Verified, s.VerifyFailed = verifySamples(peers, runs, byID)
	return s
}

// verifySamples opens the sampled direct pushes with the recipient's key
// and the sender key the push names, and checks the plaintext is the one
// the sender sealed: the broker forwarded nonce and ciphertext verbatim.
func verifySamples(peers []peerIdentity, runs []*peerRun, byID map[string]origin) (ok, failed int) {
	for _, pr := range runs {
		for _, raw := range pr.samples {
			var p struct {
				MessageID, SenderPubkey, Nonce, Ciphertext string
			}
			if json.Unmarshal(raw, &p) != nil {
				failed++
				continue
			}
			src, known := byID[p.MessageID]
			if !known || runs[src.peer].recs[src.k].target < 0 {
				continue // broadcast bodies are sealed to their sender
			}
			want := peers[src.peer].routingKey()
			pub, err := hex.DecodeString(p.SenderPubkey)
			if err != nil || p.SenderPubkey != want {
				failed++
				continue
			}
			plain, err := client.Open(p.Nonce, p.Ciphertext, ed25519.PublicKey(pub), peers[pr.idx].boxKey())
			if err != nil || !strings.HasPrefix(string(plain), fmt.Sprintf("meshload %d %d ", src.peer, src.k)) {
				failed++
				continue
			}
			ok++
		}
	}
	return ok, failed
}

func printMessageSummary(w io.Writer, s messageSummary) {
	fmt.Fprintf(w, "meshload: %d peers x %d msgs, priority %s, %s, %s hello, broadcast share %.2f, window %d, client_ack %v\n",
		s.Peers, s.MessagesPer, s.Priority, rateString(s.Rate), map[bool]string{true: "session", false: "member"}[s.Sessions],
		s.BroadcastShare, s.Window, s.ClientAck)
	fmt.Fprintf(w, "  sent          %d (dispatched in %.2f s)\n", s.Sent, s.DispatchSec)
	fmt.Fprintf(w, "  acked         %d queued, %d rejected, %d unanswered", s.Acked, s.Rejected, s.Unacked)
	if s.RejectSample != "" {
		fmt.Fprintf(w, " (e.g. %q)", s.RejectSample)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "  delivered     %d/%d (%.2f%%), timed out %d, duplicates %d, misrouted %d, unknown %d\n",
		s.Delivered, s.Expected, s.DeliveredPct, s.TimedOut, s.Duplicates, s.Misrouted, s.Unknown)
	if s.Duplicates > 0 {
		fmt.Fprintf(w, "  duplicates arrived after the first push: %s\n", s.DupAfter)
	}
	if s.SocketsLost > 0 {
		fmt.Fprintf(w, "  sockets lost  %d closed by the broker or network during the run (first: %s)\n", s.SocketsLost, s.LostReason)
	}
	fmt.Fprintf(w, "  throughput    %.0f msgs/s accepted, %.0f msgs/s delivered\n", s.AcceptedPerSec, s.DeliverPerSec)
	fmt.Fprintf(w, "  e2e (push-send)  %s\n", s.E2E)
	fmt.Fprintf(w, "  send->ack        %s\n", s.Ack)
	fmt.Fprintf(w, "  crypto_box    %d sampled pushes opened, %d failed\n", s.Verified, s.VerifyFailed)
	if s.RSS.Samples > 0 {
		fds := "n/a"
		if s.RSS.PeakFDs >= 0 {
			fds = strconv.FormatInt(s.RSS.PeakFDs, 10)
		}
		fmt.Fprintf(w, "  broker RSS    baseline %s, peak %s, end %s; peak fds %s (%d samples)\n",
			mb(s.RSS.Baseline), mb(s.RSS.Peak), mb(s.RSS.Last), fds, s.RSS.Samples)
	} else {
		fmt.Fprintf(w, "  broker RSS    not sampled (use --broker-pid or --metrics-url)\n")
	}
	if s.DrainTimedOut {
		fmt.Fprintf(w, "  drain timed out\n")
	}
	fmt.Fprintf(w, "  wall time     %.1f s\n", s.WallSec)
}
