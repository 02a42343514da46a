// Package faultload drives a real meshbroker binary through faults (kill -9,
// SIGTERM, a database restart) while counting every message by id: the
// sender side records each acked messageId, the receiver side each pushed
// one, so loss (acked, never delivered), duplicates (delivered more than
// once) and committed-but-unacked sends (stored rows no sender got an ack
// for) are exact counts, not estimates. The fault suite (faulttest) and
// meshload's --fault mode share it.
//
// Concurrency: a Load runs one goroutine per receiver (connect, read,
// reconnect after the socket ends, until its context ends) and, per sender,
// one pacing goroutine and Window goroutines that each send and wait for
// the ack. All counters are guarded by Load.mu. A Broker is one child
// process; its Wait goroutine is the only one that reaps it.
package faultload

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// Broker is a meshbroker child process.
type Broker struct {
	Port   int
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // Wait's result, set before exited closes
}

// FreePort returns a loopback port that was free a moment ago; the broker
// binds it with SO_REUSEADDR, so a restart on the same port works.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// StartBroker runs bin with env (on top of PATH and HOME only, so the
// caller's DATABASE_URL and the like never leak in) on port, logging to
// logw, and returns once /health/ready answers 200.
func StartBroker(ctx context.Context, bin string, port int, env []string, logw io.Writer) (*Broker, error) {
	cmd := exec.Command(bin)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"),
		"BROKER_HOST=127.0.0.1", "BROKER_PORT=" + strconv.Itoa(port)}, env...)
	cmd.Stdout, cmd.Stderr = logw, logw
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	b := &Broker{Port: port, cmd: cmd, exited: make(chan struct{})}
	go func() { b.err = cmd.Wait(); close(b.exited) }()
	ready := fmt.Sprintf("http://127.0.0.1:%d/health/ready", port)
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ready, nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return b, nil
			}
		}
		select {
		case <-b.exited:
			return nil, fmt.Errorf("broker exited before it was ready: %v", b.err)
		case <-ctx.Done():
			b.Kill()
			return nil, fmt.Errorf("broker not ready: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond): // polling the readiness route
		}
	}
}

// URL is the broker's WebSocket URL.
func (b *Broker) URL() string { return fmt.Sprintf("ws://127.0.0.1:%d/ws", b.Port) }

// Signal sends sig to the broker.
func (b *Broker) Signal(sig syscall.Signal) error { return b.cmd.Process.Signal(sig) }

// Wait waits for the broker to exit and returns its exit error (nil for
// status 0).
func (b *Broker) Wait(ctx context.Context) error {
	select {
	case <-b.exited:
		return b.err
	case <-ctx.Done():
		return fmt.Errorf("broker did not exit: %w", ctx.Err())
	}
}

// Kill ends the broker with SIGKILL and reaps it; a no-op once it exited.
func (b *Broker) Kill() {
	select {
	case <-b.exited:
		return
	default:
	}
	_ = b.cmd.Process.Kill()
	<-b.exited
}

// Mesh is a seeded mesh: senders connect with member hellos, receivers with
// session hellos on a fixed session key and id, so a reconnect after a
// restart drains the rows addressed to them.
type Mesh struct {
	ID        string
	Senders   []client.Identity
	Receivers []Receiver
}

// Receiver is a receiving peer.
type Receiver struct {
	ID        client.Identity
	Session   client.Session
	SessionID string
}

// Seed creates a mesh with senders + receivers members on db.
func Seed(ctx context.Context, db *models.DB, senders, receivers int) (Mesh, error) {
	prov := services.NewProvisionService(db, time.Now)
	owner, err := prov.CreateMesh(ctx, "fault-"+models.NewID()[:6], "", "owner")
	if err != nil {
		return Mesh{}, err
	}
	m := Mesh{ID: owner.MeshID}
	add := func(name string) (client.Identity, error) {
		_, k, err := ed25519.GenerateKey(nil)
		if err != nil {
			return client.Identity{}, err
		}
		id, err := prov.AddMember(ctx, owner.MeshID, protocol.PubkeyHex(k), name, "member")
		if err != nil {
			return client.Identity{}, err
		}
		return client.Identity{MeshID: owner.MeshID, MemberID: id.MemberID, DisplayName: name, Key: k}, nil
	}
	for i := range senders {
		id, err := add(fmt.Sprint("sender", i))
		if err != nil {
			return Mesh{}, err
		}
		m.Senders = append(m.Senders, id)
	}
	for i := range receivers {
		id, err := add(fmt.Sprint("receiver", i))
		if err != nil {
			return Mesh{}, err
		}
		m.Receivers = append(m.Receivers, Receiver{ID: id, Session: client.NewSession(), SessionID: fmt.Sprint("rcv", i)})
	}
	return m, nil
}

// OpenDB opens (and bootstraps) the broker's database from this process:
// for seeding before the broker starts and for counting rows after.
func OpenDB(ctx context.Context, databaseURL, dataDir string) (*models.DB, error) {
	db, err := models.Open(ctx, databaseURL, dataDir, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	if err := db.Bootstrap(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	return db, nil
}

// Undelivered counts the mesh's rows without delivered_at: while it is
// above zero, a push may still come.
func Undelivered(ctx context.Context, db *models.DB, meshID string) (int64, error) {
	var n int64
	err := db.WithContext(ctx).Raw("SELECT count(*) FROM "+db.Table("message_queue")+" WHERE mesh_id = ? AND delivered_at IS NULL", meshID).Scan(&n).Error
	return n, err
}

// Committed lists the ids of every row stored for the mesh.
func Committed(ctx context.Context, db *models.DB, meshID string) ([]string, error) {
	var ids []string
	err := db.WithContext(ctx).Raw("SELECT id FROM "+db.Table("message_queue")+" WHERE mesh_id = ?", meshID).Scan(&ids).Error
	return ids, err
}

// Load is the traffic: paced, pipelined senders and non-acking receivers
// that answer pings and reconnect whenever their socket ends.
type Load struct {
	URL    string
	Mesh   Mesh
	Rate   float64 // sends per second per sender
	Window int     // sends in flight per sender
	// Reconnect makes senders reconnect after their socket ends (a
	// database restart); otherwise a sender stops with its socket.
	Reconnect bool

	mu          sync.Mutex
	acked       map[string]bool
	delivered   map[string]int
	sendErrors  map[string]int // "code: message" of error replies and rejections
	connected   map[int]bool   // receivers with an open socket
	connects    int            // receiver hellos, first ones included
	badEnvelope int
	senders     sync.WaitGroup
	receivers   sync.WaitGroup
}

// NewLoad prepares a load on url for m.
func NewLoad(url string, m Mesh, rate float64, window int) *Load {
	return &Load{URL: url, Mesh: m, Rate: rate, Window: window,
		acked: map[string]bool{}, delivered: map[string]int{}, sendErrors: map[string]int{}, connected: map[int]bool{}}
}

// StartReceivers connects every receiver; each reconnects until ctx ends.
func (l *Load) StartReceivers(ctx context.Context) {
	for i, r := range l.Mesh.Receivers {
		l.receivers.Add(1)
		go func() {
			defer l.receivers.Done()
			l.receive(ctx, i, r)
		}()
	}
}

func (l *Load) receive(ctx context.Context, i int, r Receiver) {
	for ctx.Err() == nil {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		c, err := client.Connect(cctx, l.URL, r.ID, client.Options{Session: &r.Session, SessionID: r.SessionID, Cwd: "/fault/" + r.SessionID, EventBuffer: 16384})
		cancel()
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond): // the broker is down or restarting: retry
			}
			continue
		}
		l.mu.Lock()
		l.connected[i] = true
		l.connects++
		l.mu.Unlock()
		n := 0
	read:
		for {
			select {
			case f := <-c.Events():
				n++
				l.record(f, r, n%64 == 1)
			case <-c.Done():
				break read
			case <-ctx.Done():
				c.Kill()
				break read
			}
		}
		// Frames read off the wire before the socket ended count too.
		for {
			select {
			case f := <-c.Events():
				l.record(f, r, false)
				continue
			default:
			}
			break
		}
		l.mu.Lock()
		l.connected[i] = false
		l.mu.Unlock()
	}
}

type pushHead struct {
	Type         string `json:"type"`
	Subtype      string `json:"subtype"`
	MessageID    string `json:"messageId"`
	SenderPubkey string `json:"senderPubkey"`
	Nonce        string `json:"nonce"`
	Ciphertext   string `json:"ciphertext"`
}

// record counts a message push; open also opens its envelope (a sample).
func (l *Load) record(f client.Frame, r Receiver, open bool) {
	if f.Type != "push" {
		return
	}
	var p pushHead
	if err := f.Decode(&p); err != nil || p.Subtype != "" || p.MessageID == "" {
		return
	}
	bad := false
	if open {
		pk, err := hex.DecodeString(p.SenderPubkey)
		if err != nil || len(pk) != ed25519.PublicKeySize {
			bad = true
		} else if _, err := client.Open(p.Nonce, p.Ciphertext, ed25519.PublicKey(pk), r.Session.Key); err != nil {
			bad = true
		}
	}
	l.mu.Lock()
	l.delivered[p.MessageID]++
	if bad {
		l.badEnvelope++
	}
	l.mu.Unlock()
}

// Connected counts receivers with an open socket.
func (l *Load) Connected() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, ok := range l.connected {
		if ok {
			n++
		}
	}
	return n
}

// StartSenders connects every sender and sends until ctx ends (or, without
// Reconnect, until its socket ends), each sender to random receivers.
func (l *Load) StartSenders(ctx context.Context) error {
	type envelope struct{ target, nonce, ct string }
	for si, id := range l.Mesh.Senders {
		// Real crypto_box envelopes, sealed once per receiver: sealing per
		// message would make the load generator the bottleneck.
		envs := make([]envelope, len(l.Mesh.Receivers))
		for j, r := range l.Mesh.Receivers {
			n, ct, err := client.Seal([]byte(fmt.Sprintf("fault load %d->%d", si, j)), r.Session.Key.Public().(ed25519.PublicKey), id.Key)
			if err != nil {
				return err
			}
			envs[j] = envelope{r.Session.Pubkey(), n, ct}
		}
		tokens := make(chan struct{}, l.Window)
		senderDone := make(chan struct{})
		l.senders.Add(1)
		go func() { // pacing, until the sender is done
			defer l.senders.Done()
			t := time.NewTicker(time.Duration(float64(time.Second) / l.Rate))
			defer t.Stop()
			for {
				select {
				case <-senderDone:
					return
				case <-t.C:
					select {
					case tokens <- struct{}{}:
					default: // the window is full: this tick is skipped
					}
				}
			}
		}()
		l.senders.Add(1)
		go func() {
			defer l.senders.Done()
			defer close(senderDone)
			for ctx.Err() == nil {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				c, err := client.Connect(cctx, l.URL, id, client.Options{SessionID: fmt.Sprint("snd", si), Cwd: fmt.Sprint("/fault/snd", si)})
				cancel()
				if err != nil {
					if !l.Reconnect {
						l.countError("connect: " + err.Error())
						return
					}
					select {
					case <-ctx.Done():
					case <-time.After(50 * time.Millisecond):
					}
					continue
				}
				var inflight sync.WaitGroup
				for k := range l.Window {
					inflight.Add(1)
					go func() {
						defer inflight.Done()
						rnd := rand.New(rand.NewPCG(uint64(si), uint64(k)))
						for {
							select {
							case <-ctx.Done():
								return
							case <-c.Done():
								return
							case <-tokens:
							}
							e := envs[rnd.IntN(len(envs))]
							l.send(ctx, c, e.target, e.nonce, e.ct)
						}
					}()
				}
				inflight.Wait()
				c.Kill()
				if !l.Reconnect {
					return
				}
			}
		}()
	}
	return nil
}

func (l *Load) send(ctx context.Context, c *client.Client, target, nonce, ct string) {
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	ack, err := c.Send(sctx, client.SendRequest{TargetSpec: target, Priority: "now", Nonce: nonce, Ciphertext: ct})
	var er *client.ErrorReply
	switch {
	case errors.As(err, &er):
		l.countError(er.Code + ": " + er.Message)
	case err != nil:
		// The socket ended with the send unanswered: not acked, not counted.
	case !ack.Queued:
		l.countError("rejected: " + ack.Error)
	default:
		l.mu.Lock()
		l.acked[ack.MessageID] = true
		l.mu.Unlock()
	}
}

func (l *Load) countError(what string) {
	l.mu.Lock()
	l.sendErrors[what]++
	l.mu.Unlock()
}

// WaitSenders waits for the sender goroutines (after their ctx ended or
// their sockets closed).
func (l *Load) WaitSenders() { l.senders.Wait() }

// WaitReceivers waits for the receiver goroutines after their ctx ended.
func (l *Load) WaitReceivers() { l.receivers.Wait() }

// Acked counts acked sends so far.
func (l *Load) Acked() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.acked)
}

// Has reports whether a receiver has had the message id.
func (l *Load) Has(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.delivered[id] > 0
}

// Lost counts acked messages no receiver has had yet.
func (l *Load) Lost() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for id := range l.acked {
		if l.delivered[id] == 0 {
			n++
		}
	}
	return n
}

// Report is what a run counted.
type Report struct {
	Acked            int            `json:"acked"`
	Delivered        int            `json:"delivered"`  // distinct ids pushed
	Duplicates       int            `json:"duplicates"` // pushes beyond the first, per id
	Lost             int            `json:"lost"`       // acked, never pushed
	CommittedUnacked int            `json:"committedUnacked"`
	Committed        int            `json:"committed"`
	BadEnvelopes     int            `json:"badEnvelopes"`
	ReceiverConnects int            `json:"receiverConnects"`
	SendErrors       map[string]int `json:"sendErrors,omitempty"`
}

// DuplicatePercent is duplicates as a percentage of acked sends.
func (r Report) DuplicatePercent() float64 {
	if r.Acked == 0 {
		return 0
	}
	return 100 * float64(r.Duplicates) / float64(r.Acked)
}

func (r Report) String() string {
	return fmt.Sprintf("acked %d, committed %d, delivered %d, lost %d, duplicates %d (%.2f%% of acked), committed-but-unacked %d, bad envelopes %d, receiver connects %d, send errors %v",
		r.Acked, r.Committed, r.Delivered, r.Lost, r.Duplicates, r.DuplicatePercent(), r.CommittedUnacked, r.BadEnvelopes, r.ReceiverConnects, r.SendErrors)
}

// Report counts what happened; committed are the mesh's stored row ids
// (nil: committed-but-unacked is not counted).
func (l *Load) Report(committed []string) Report {
	l.mu.Lock()
	defer l.mu.Unlock()
	r := Report{Acked: len(l.acked), Delivered: len(l.delivered), Committed: len(committed), BadEnvelopes: l.badEnvelope,
		ReceiverConnects: l.connects, SendErrors: map[string]int{}}
	for id := range l.acked {
		if l.delivered[id] == 0 {
			r.Lost++
		}
	}
	for _, n := range l.delivered {
		r.Duplicates += n - 1
	}
	for _, id := range committed {
		if !l.acked[id] {
			r.CommittedUnacked++
		}
	}
	for k, v := range l.sendErrors {
		r.SendErrors[k] = v
	}
	return r
}

// Settle waits until every acked message was delivered and the mesh has no
// undelivered row left (so no further push can come), polling db; it
// returns ctx's error if that does not happen in time. Query errors (a
// database restarting) count as not yet.
func (l *Load) Settle(ctx context.Context, db *models.DB) error {
	for {
		if l.Lost() == 0 {
			n, err := Undelivered(ctx, db, l.Mesh.ID)
			if err == nil && n == 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not settled (%d acked messages not delivered yet): %w", l.Lost(), ctx.Err())
		case <-time.After(50 * time.Millisecond): // polling the counters and the table
		}
	}
}
