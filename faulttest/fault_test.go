// Package faulttest is the fault suite: it builds the real meshbroker binary
// and runs it as a child process (internal/brokerproc) on its own storage
// (an SQLite DATA_DIR, or a fresh database on TEST_DATABASE_URL's server, or
// a private Postgres cluster it starts itself) and drives it through kill
// -9, SIGTERM, a frozen reader and a Postgres restart under load, counting
// every message by id (internal/faultload). Loss assertions are exact;
// duplicates are bounded as a percentage of acked sends; nothing is timed.
package faulttest

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/internal/brokerproc"
	"github.com/claudemesh/meshbroker/internal/faultload"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// TestMain goes through brokerproc.Main, which removes the broker binary
// the scenarios build once between them.
func TestMain(m *testing.M) { os.Exit(brokerproc.Main(m.Run)) }

// eachStorage runs fn on SQLite and, with TEST_DATABASE_URL, on a fresh
// Postgres database.
func eachStorage(t *testing.T, fn func(t *testing.T, st brokerproc.Storage)) {
	t.Run("sqlite", func(t *testing.T) { fn(t, brokerproc.SQLiteStorage(t)) })
	t.Run("postgres", func(t *testing.T) {
		if os.Getenv(modelstest.EnvDatabaseURL) == "" {
			t.Skip("TEST_DATABASE_URL unset: the Postgres run is skipped")
		}
		fn(t, brokerproc.PostgresStorage(t))
	})
}

// baseEnv is the child's configuration: no send limit, short claims so a
// killed broker's claims run out within the test, generous shutdown waits
// (a busy machine answers pings late; a client that answers ends the wait),
// logs at info, where the start line names the port the kernel picked (the
// lines a connection adds are few next to the load's messages).
func baseEnv(extra ...string) []string {
	return append([]string{
		"SEND_RATE_LIMIT_PER_MIN=0", "MAX_CONNECTIONS_PER_MESH=500", "LOG_LEVEL=info",
		"CLAIM_LEASE_MS=1500", "CLAIM_REAP_INTERVAL_MS=100",
		"SHUTDOWN_CONFIRM_MS=5000", "SHUTDOWN_TIMEOUT_MS=30000",
	}, extra...)
}

// scenario is one broker, its database handle and its seeded mesh; the
// broker's log goes to the test log if the test fails.
type scenario struct {
	t      *testing.T
	broker *brokerproc.Broker
	db     *models.DB
	mesh   faultload.Mesh
}

func newScenario(t *testing.T, st brokerproc.Storage, senders, receivers int, env []string) *scenario {
	t.Helper()
	ctx := ctxFor(t, time.Minute)
	db, err := faultload.OpenDB(ctx, st.DatabaseURL, st.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	mesh, err := faultload.Seed(ctx, db, senders, receivers)
	if err != nil {
		t.Fatal(err)
	}
	// Its cleanup kills the process before the database cleanups
	// registered above run.
	b := brokerproc.New(t, brokerproc.Options{Storage: st, Env: env})
	return &scenario{t: t, broker: b, db: db, mesh: mesh}
}

// start starts the broker, again on the same port after the first time,
// and returns once /health/ready answers 200.
func (s *scenario) start() *brokerproc.Broker {
	s.t.Helper()
	s.broker.Start()
	return s.broker
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitUntil polls cond until it holds or the deadline passes.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Load shape: 10 pipelined senders (8 sends in flight each), 10 non-acking
// receivers that answer pings, 100 sends/s per sender, the fault once
// 6,000 sends were acked (about 6 s, as in issue 13). Duplicates after a
// crash come from the last confirmation interval only (PUSH_CONFIRM_MS,
// the pong, DELIVERED_FLUSH_MS, the commit: about 80 ms measured here), a
// slice of time, so they are bounded as a percentage of what was acked; at
// 5 % of 6 s that slice may stretch to 300 ms on a slow machine.
const (
	senders, receivers = 10, 10
	ratePerSender      = 100
	window             = 8
	ackedBeforeFault   = 6000
	killDuplicateBound = 5.0 // percent of acked (issue 13 item 3)
)

// runSignalled drives load, signals the broker, restarts it on the same
// database and waits until every acked message was delivered and nothing
// is left to push.
func runSignalled(t *testing.T, st brokerproc.Storage, sig syscall.Signal) faultload.Report {
	began := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(began).Seconds(), what) }
	s := newScenario(t, st, senders, receivers, baseEnv())
	b := s.start()
	phase("broker ready")
	load := faultload.NewLoad(b.URL(), s.mesh, ratePerSender, window)
	rctx, stopReceivers := context.WithCancel(context.Background())
	defer func() { stopReceivers(); load.WaitReceivers() }()
	load.StartReceivers(rctx)
	waitUntil(t, time.Minute, "receivers connected", func() bool { return load.Connected() == receivers })
	sctx, stopSenders := context.WithCancel(context.Background())
	defer stopSenders()
	if err := load.StartSenders(sctx); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 2*time.Minute, "acked sends before the fault", func() bool { return load.Acked() >= ackedBeforeFault })
	phase(fmt.Sprintf("%d acked: %s", load.Acked(), sig))
	b.Signal(sig)
	err := b.Wait(time.Minute)
	phase("broker exited")
	if sig == syscall.SIGTERM && err != nil {
		t.Errorf("SIGTERM: broker exited with %v", err)
	}
	load.WaitSenders() // every sender's socket ended with the broker
	s.start()
	phase("broker restarted")
	if err := load.Settle(ctxFor(t, 2*time.Minute), s.db); err != nil {
		t.Errorf("after restart: %v", err)
	}
	phase("settled")
	committed, err := faultload.Committed(ctxFor(t, time.Minute), s.db, s.mesh.ID)
	if err != nil {
		t.Fatal(err)
	}
	r := load.Report(committed)
	t.Logf("%s: %s", sig, r)
	if r.Lost != 0 {
		t.Errorf("%d acked messages lost", r.Lost)
	}
	if r.BadEnvelopes != 0 {
		t.Errorf("%d pushes did not open", r.BadEnvelopes)
	}
	if r.Acked < ackedBeforeFault {
		t.Errorf("only %d sends acked", r.Acked)
	}
	return r
}

// Issue 13 item 3: kill -9 under load, restart on the same database: not
// one acked message lost, duplicates within 5 % of acked.
func TestKillUnderLoad(t *testing.T) {
	eachStorage(t, func(t *testing.T, st brokerproc.Storage) {
		r := runSignalled(t, st, syscall.SIGKILL)
		if p := r.DuplicatePercent(); p > killDuplicateBound {
			t.Errorf("duplicates %.2f%% of acked, bound %.0f%%", p, killDuplicateBound)
		}
	})
}

// Issue 13 item 4: SIGTERM under load, restart on the same database: no
// loss, no duplicate for these ping-answering receivers, and every
// committed send was acked before its socket closed.
func TestSigtermUnderLoad(t *testing.T) {
	eachStorage(t, func(t *testing.T, st brokerproc.Storage) {
		r := runSignalled(t, st, syscall.SIGTERM)
		if r.Duplicates != 0 {
			t.Errorf("%d duplicates after a graceful shutdown", r.Duplicates)
		}
		if r.CommittedUnacked != 0 {
			t.Errorf("%d sends committed but never acked", r.CommittedUnacked)
		}
	})
}

// Issue 13 item 2: a non-acking receiver that stops reading while its
// claims run out, then drops and reconnects, gets every acked message.
func TestFrozenReader(t *testing.T) {
	eachStorage(t, func(t *testing.T, st brokerproc.Storage) {
		s := newScenario(t, st, 1, 1, baseEnv("CLAIM_LEASE_MS=300", "CLAIM_REAP_INTERVAL_MS=20"))
		b := s.start()
		ctx := ctxFor(t, 2*time.Minute)
		rcv := s.mesh.Receivers[0]
		// An event buffer of one: the client's reader blocks on its second
		// frame and reads nothing more, pings included.
		frozen, err := client.Connect(ctx, b.URL(), rcv.ID, client.Options{Session: &rcv.Session, SessionID: rcv.SessionID, EventBuffer: 1})
		if err != nil {
			t.Fatal(err)
		}
		sender, err := client.Connect(ctx, b.URL(), s.mesh.Senders[0], client.Options{SessionID: "snd"})
		if err != nil {
			t.Fatal(err)
		}
		defer sender.Kill()
		acked := map[string]bool{}
		for i := range 20 {
			ack, err := sender.SendSealed(ctx, rcv.Session.Pubkey(), rcv.Session.Key.Public().(ed25519.PublicKey), "now", []byte(fmt.Sprint("frozen ", i)))
			if err != nil || !ack.Queued {
				t.Fatalf("send %d: %+v %v", i, ack, err)
			}
			acked[ack.MessageID] = true
		}
		// Every row goes through a claim expiry while the reader is frozen:
		// it is then either proven delivered or claimed again.
		firstExpiry := map[string]time.Time{}
		waitUntil(t, time.Minute, "every claim expired and resolved", func() bool {
			var rows []struct {
				ID             string
				DeliveredAt    *time.Time
				ClaimedAt      *time.Time
				ClaimExpiresAt *time.Time
			}
			if err := s.db.WithContext(ctx).Raw("SELECT id, delivered_at, claimed_at, claim_expires_at FROM "+s.db.Table("message_queue")+" WHERE mesh_id = ?", s.mesh.ID).Scan(&rows).Error; err != nil {
				t.Fatal(err)
			}
			done := 0
			for _, r := range rows {
				switch {
				case r.DeliveredAt != nil:
					done++
				case r.ClaimedAt == nil || r.ClaimExpiresAt == nil:
				case firstExpiry[r.ID].IsZero():
					firstExpiry[r.ID] = *r.ClaimExpiresAt
				case r.ClaimedAt.After(firstExpiry[r.ID]):
					done++
				}
			}
			return done == len(acked)
		})
		got := map[string]bool{}
		for _, id := range drainDead(t, frozen) {
			got[id] = true
		}
		load := faultload.NewLoad(b.URL(), s.mesh, 1, 1)
		rctx, stop := context.WithCancel(context.Background())
		load.StartReceivers(rctx)
		defer func() { stop(); load.WaitReceivers() }()
		waitUntil(t, time.Minute, "every acked message delivered after the reconnect", func() bool {
			missing := 0
			for id := range acked {
				if !got[id] && !load.Has(id) {
					missing++
				}
			}
			return missing == 0
		})
	})
}

// drainDead closes c and returns the message ids it had read off the wire,
// those still in its event buffer included.
func drainDead(t *testing.T, c *client.Client) []string {
	t.Helper()
	closed := make(chan struct{})
	go func() { c.Kill(); close(closed) }()
	var ids []string
	take := func(f client.Frame) {
		var p struct {
			Type, Subtype, MessageID string
		}
		if f.Type == "push" && f.Decode(&p) == nil && p.Subtype == "" && p.MessageID != "" {
			ids = append(ids, p.MessageID)
		}
	}
	for {
		select {
		case f := <-c.Events():
			take(f)
		case <-closed:
			for {
				select {
				case f := <-c.Events():
					take(f)
				default:
					return ids
				}
			}
		}
	}
}
