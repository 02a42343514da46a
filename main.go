// Command meshbroker is a routing-only broker for claudemesh: it
// authenticates peers, keeps their presence through short disconnects and
// delivers end-to-end encrypted envelopes it cannot read.
//
// main.go is wiring only: configuration, storage, services, the HTTP edge,
// background jobs and shutdown. The provisioning subcommands are in cli.go.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/handlers"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
	"github.com/claudemesh/meshbroker/toolbox"
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

// run is main with its inputs and outputs injected; it returns the exit code.
func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cfg, err := config.Load(getenv)
	if len(args) > 0 && (args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
		fmt.Fprint(stdout, usage)
		fmt.Fprint(stdout, config.Usage())
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "meshbroker:", err)
		return 1
	}
	logger := newLogger(stderr, cfg.LogLevel)
	if len(args) > 0 {
		return runCommand(args, cfg, logger, stdout, stderr)
	}
	// Process-wide, so set here rather than in startBroker, which tests
	// share one process for.
	debug.SetGCPercent(cfg.GCPercent)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	b, err := startBroker(ctx, cfg, logger)
	if err != nil {
		logger.Error("start", "err", err)
		return 1
	}
	select {
	case <-ctx.Done():
		logger.Info("shutdown signal", "budget_ms", cfg.ShutdownTimeout.Milliseconds())
	case <-b.owner.Lost():
		logger.Error("another broker took over this database's leases; stopping", "budget_ms", cfg.ShutdownTimeout.Milliseconds())
	}
	began := time.Now()
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := b.Close(shutdownCtx); err != nil {
		logger.Error("shutdown", "err", err, "duration_ms", time.Since(began).Milliseconds())
		return 1
	}
	logger.Info("shutdown complete", "duration_ms", time.Since(began).Milliseconds())
	return 0
}

// newLogger writes one JSON object per line with the reference's keys:
// ts (ISO ms), level (lower case), component, msg.
func newLogger(w io.Writer, level slog.Level) *slog.Logger {
	h := slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level, ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) > 0 {
			return a
		}
		switch a.Key {
		case slog.TimeKey:
			return slog.String("ts", protocol.ISO(a.Value.Time()))
		case slog.LevelKey:
			return slog.String("level", strings.ToLower(a.Value.String()))
		}
		return a
	}})
	return slog.New(h).With("component", "broker")
}

// broker is one running meshbroker: the same wiring serves main and the
// end-to-end tests.
type broker struct {
	cfg       config.Config
	log       *slog.Logger
	db        *models.DB
	metrics   *services.Metrics
	presence  *services.PresenceService
	messaging *services.MessagingService
	status    *services.StatusService
	queue     *services.QueueService
	audit     *services.AuditService
	health    *services.HealthService
	realtime  *services.Realtime
	toolbox   *toolbox.Toolbox
	server    *handlers.Server
	owner     *models.OwnerLock // this process owns the database's leases while it holds it
	ln        net.Listener
	admin     *http.Server // ADMIN_ADDR's pprof listener, or nil
	adminLn   net.Listener

	now       func() time.Time
	stopJobs  context.CancelFunc
	jobs      sync.WaitGroup
	served    chan error
	closeOnce sync.Once
	closeErr  error
}

// startBroker opens storage, bootstraps the schema, wires the services and
// starts listening; it returns once the port is bound.
func startBroker(ctx context.Context, cfg config.Config, logger *slog.Logger) (*broker, error) {
	return startBrokerWithClock(ctx, cfg, logger, time.Now)
}

// startBrokerWithClock is startBroker with the services' clock injected
// (tests move it forward to refill rate limits without sleeping).
func startBrokerWithClock(ctx context.Context, cfg config.Config, logger *slog.Logger, now func() time.Time) (*broker, error) {
	for _, w := range cfg.Warnings {
		logger.Warn("config warning", "detail", w)
	}
	db, err := models.OpenRetrying(ctx, cfg.DatabaseURL, cfg.DataDir, logger, models.Options{SQLiteSynchronous: cfg.SQLiteSynchronous},
		models.RetryPolicy{Timeout: cfg.DBStartTimeout, Min: cfg.DBRetryMin, Max: cfg.DBRetryMax})
	if err != nil {
		return nil, err
	}
	if err := db.Bootstrap(ctx); err != nil {
		db.Close()
		return nil, err
	}
	warnExpectedSchema(ctx, cfg.ExpectedSchema, db, logger)
	// One owner of the leases at a time: a second broker on this database
	// waits here, before it restores or listens, until the first has gone.
	owner, err := models.AcquireOwnerLock(ctx, db, cfg.DataDir, logger)
	if err != nil {
		db.Close()
		return nil, err
	}
	b, err := newBroker(ctx, cfg, logger, db, owner, now)
	if err != nil {
		owner.Release()
		db.Close()
		return nil, err
	}
	return b, nil
}

// newBroker wires services on an open, bootstrapped database and listens.
func newBroker(ctx context.Context, cfg config.Config, logger *slog.Logger, db *models.DB, owner *models.OwnerLock, now func() time.Time) (*broker, error) {
	b := &broker{cfg: cfg, log: logger, db: db, owner: owner, metrics: services.NewMetrics(), served: make(chan error, 1), now: now}
	if err := services.InstrumentDB(db, b.metrics); err != nil {
		return nil, err
	}
	b.metrics.SetBuildInfo(handlers.Version, cfg.BuildRevision())
	b.health = services.NewHealthService(db, logger, b.metrics, cfg.DBHealthInterval)
	b.audit = services.NewAuditService(db, logger, b.metrics, now)
	members := services.NewMemberDirectory(db, now, cfg.MemberCacheTTL)
	resumeKey, err := services.LoadResumeKey(context.Background(), db, cfg.ResumeTokenKey)
	if err != nil {
		return nil, err
	}
	// A token must outlive the connection it was issued on plus its grace,
	// so it lives as long as the longest attestation; it only ever resumes
	// an existing lease.
	resume := services.NewResumeTokens(resumeKey, cfg.MaxAttestTTL, now)
	b.status = services.NewStatusService(cfg, db, logger, b.metrics, now)
	b.presence = services.NewPresenceService(cfg, db, logger, b.metrics, members, b.status, b.audit, resume, now)
	b.queue = services.NewQueueService(cfg, db, logger, b.metrics, now)
	b.messaging = services.NewMessagingService(cfg, logger, b.metrics, now, b.presence, b.queue, b.status, members, b.audit)
	b.realtime = services.NewRealtime(cfg, db, logger, b.metrics, now, b.presence, b.audit)
	b.toolbox = newToolbox(cfg, logger, db, now, b, members)
	started := false
	defer func() {
		if !started {
			b.realtime.Close() // its persistence loop runs from construction
			if b.ln != nil {
				b.ln.Close()
			}
			if b.adminLn != nil {
				b.adminLn.Close()
			}
		}
	}()
	b.server = handlers.New(cfg, logger, handlers.Services{
		Presence: b.presence, Messaging: b.messaging, Status: b.status, Health: b.health, Audit: b.audit, Realtime: b.realtime, Toolbox: b.toolbox, Metrics: b.metrics,
		Invites:   services.NewInviteService(db, now, members),
		MemberAPI: services.NewMemberAPI(db, b.presence, members, now, cfg.HelloSkew, cfg.MemberAPISessionAuth),
		MeshVerbs: services.NewMeshVerbs(db, b.presence, now, toolboxCounters(b.toolbox)),
		Ready: func(ctx context.Context) error {
			if cfg.ExpectedSchema != "" {
				ok, err := db.HasSchemaVersion(ctx, cfg.ExpectedSchema)
				if err != nil {
					return err
				}
				if !ok {
					recorded, err := db.SchemaVersions(ctx)
					if err != nil {
						return err
					}
					return fmt.Errorf("schema version %s not recorded (recorded: %s)", cfg.ExpectedSchema, strings.Join(recorded, ", "))
				}
			}
			return db.SchemaReady(ctx)
		},
	}, now)

	// Bind both ports before touching the leases: a start that cannot
	// listen (the port is taken) must leave the previous process's leases
	// and its clean-stop record as they were, or the next start would take
	// the failed one for a crash. Connections that arrive meanwhile wait in
	// the listen backlog until Serve below.
	ln, err := net.Listen("tcp", cfg.Addr())
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", cfg.Addr(), err)
	}
	b.ln = ln
	if cfg.AdminAddr != "" {
		aln, err := net.Listen("tcp", cfg.AdminAddr)
		if err != nil {
			return nil, fmt.Errorf("listen on ADMIN_ADDR %s: %w", cfg.AdminAddr, err)
		}
		b.adminLn = aln
	}
	if _, err := b.presence.RestoreLeases(ctx); err != nil {
		return nil, err
	}
	if err := b.realtime.RestoreState(ctx); err != nil {
		return nil, err
	}
	if n, err := b.queue.ReleaseOrphanedClaims(ctx); err != nil {
		return nil, err
	} else if n > 0 {
		logger.Info("released queue claims of the previous process", "rows", n)
	}
	started = true
	if b.adminLn != nil {
		b.admin = &http.Server{Handler: handlers.AdminHandler(), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := b.admin.Serve(b.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				logger.Error("admin listener", "err", err)
			}
		}()
	}
	b.audit.Start()
	b.queue.Start()
	b.toolbox.Start()
	b.health.Check(context.Background())
	jobsCtx, cancel := context.WithCancel(context.Background())
	b.stopJobs = cancel
	b.startJobs(jobsCtx)
	go func() { b.served <- b.server.Serve(ln) }()
	storage := []any{"db", db.Dialect.String()}
	if db.Dialect == models.DialectSQLite {
		storage = append(storage, "data_dir", cfg.DataDir, "sqlite_synchronous", cfg.SQLiteSynchronous)
	} else if u, err := url.Parse(cfg.DatabaseURL); err == nil {
		// Where, never who: the URL's user and password stay out of the log.
		storage = append(storage, "db_host", u.Host, "db_name", strings.TrimPrefix(u.Path, "/"))
	}
	admin := "off"
	if b.adminLn != nil {
		admin = b.adminLn.Addr().String()
	}
	logger.Info("broker listening", append(storage, "host", cfg.Host, "port", b.Port(), "version", handlers.Version, "gitSha", cfg.BuildRevision(), "ws_path", "/ws",
		"admin_addr", admin, "hello_timeout_ms", cfg.HelloTimeout.Milliseconds(), "send_rate_limit_per_min", cfg.SendRatePerMin, "send_rate_burst", cfg.SendRateBurst,
		"ttl_seconds", int(cfg.StatusTTL.Seconds()), "hook_fresh_seconds", int(cfg.HookFreshWindow.Seconds()),
		"max_connections_per_mesh", cfg.MaxConnectionsPerMesh, "max_message_bytes", cfg.MaxMessageBytes,
		"hook_rate_limit_per_min", cfg.HookRateLimitPerMin, "hook_rate_limit_per_addr_per_min", cfg.HookAddrRateLimit,
		"hook_pending_max", cfg.HookPendingMax, "lease_ttl_ms", cfg.LeaseTTL.Milliseconds(),
		"clean_close_lease_ms", cfg.CleanCloseLease.Milliseconds(), "claim_lease_ms", cfg.ClaimLease.Milliseconds(),
		"db_start_timeout_ms", cfg.DBStartTimeout.Milliseconds(), "shutdown_timeout_ms", cfg.ShutdownTimeout.Milliseconds(),
		"toolbox_max_memories", cfg.Toolbox.MaxMemories, "toolbox_max_tasks", cfg.Toolbox.MaxTasks,
		"toolbox_max_schedules", cfg.Toolbox.MaxSchedules, "toolbox_max_skills", cfg.Toolbox.MaxSkills,
		"toolbox_max_vault_entries", cfg.Toolbox.MaxVaultEntries, "toolbox_max_item_bytes", cfg.Toolbox.MaxItemBytes)...)
	return b, nil
}

// warnExpectedSchema says at start, once, when EXPECTED_MIGRATION names a
// version this database has not recorded, and which versions it has: the
// broker still starts (a migration may be on its way), but /health/ready
// answers 503 until the version appears.
func warnExpectedSchema(ctx context.Context, expected string, db *models.DB, logger *slog.Logger) {
	if expected == "" {
		return
	}
	ok, err := db.HasSchemaVersion(ctx, expected)
	if err != nil || ok {
		return // the readiness check reports a failing query
	}
	recorded, err := db.SchemaVersions(ctx)
	if err != nil {
		return
	}
	logger.Warn("EXPECTED_MIGRATION is not recorded in this database; /health/ready answers 503 until it is",
		"expected", expected, "recorded", recorded, "this_build_records", models.SchemaVersion)
}

// AdminAddr is the admin listener's bound address, or "" without one.
func (b *broker) AdminAddr() string {
	if b.adminLn == nil {
		return ""
	}
	return b.adminLn.Addr().String()
}

// Port is the bound port (useful with BROKER_PORT=0).
func (b *broker) Port() int { return b.ln.Addr().(*net.TCPAddr).Port }

// every runs fn every interval until ctx ends.
func (b *broker) every(ctx context.Context, name string, interval time.Duration, fn func(context.Context) error) {
	b.jobs.Add(1)
	go func() {
		defer b.jobs.Done()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if err := fn(ctx); err != nil && ctx.Err() == nil {
					b.log.Error("background job", "job", name, "err", err)
				}
			}
		}
	}()
}

func (b *broker) startJobs(ctx context.Context) {
	cfg := b.cfg
	b.jobs.Add(1)
	go func() { defer b.jobs.Done(); b.health.Run(ctx) }()
	b.every(ctx, "pong flush", max(cfg.PingInterval/3, time.Millisecond), b.presence.FlushPongs)
	b.every(ctx, "lease flush", cfg.LeaseFlush, b.presence.FlushLeases)
	b.every(ctx, "owner lock check", 5*time.Second, b.owner.Check)
	b.every(ctx, "stale presence sweep", cfg.StaleSweep, func(ctx context.Context) error { _, err := b.presence.SweepStale(ctx); return err })
	b.every(ctx, "stale pong watchdog", cfg.PingInterval, func(context.Context) error {
		for _, o := range b.presence.StaleSockets() {
			o.Terminate()
		}
		return nil
	})
	b.every(ctx, "status ttl sweep", cfg.StatusSweepInterval, func(ctx context.Context) error { _, err := b.status.SweepTTL(ctx); return err })
	b.every(ctx, "pending status sweep", cfg.PendingSweepInterval, b.status.SweepPending)
	b.every(ctx, "claim reaper", cfg.ClaimReapInterval, func(ctx context.Context) error {
		if err := b.messaging.SweepInflight(ctx, b.now()); err != nil {
			return err
		}
		return b.messaging.ReapAndRedrain(ctx)
	})
	b.every(ctx, "orphan sweep", cfg.OrphanSweepInterval, func(ctx context.Context) error { _, err := b.queue.SweepOrphans(ctx); return err })
	b.every(ctx, "queue depth", cfg.QueueDepthInterval, func(ctx context.Context) error {
		n, err := b.queue.Depth(ctx)
		if err == nil {
			b.metrics.QueueDepth.Set(float64(n))
		}
		return err
	})
	b.every(ctx, "toolbox purge", cfg.Toolbox.PurgeInterval, b.toolbox.Purge)
	b.every(ctx, "rate limit gc", cfg.RateLimitGCInterval, func(context.Context) error { b.status.GCBuckets(); b.messaging.GCBuckets(); return nil })
	// With the collector off (GOGC=off) the broker would always look quiet
	// and every trim would force the collection the operator turned off.
	if cfg.MemoryTrimEvery > 0 && cfg.GCPercent >= 0 {
		trimmer := services.NewMemoryTrimmer(cfg.MemoryTrimMin)
		b.every(ctx, "memory trim", cfg.MemoryTrimEvery, func(context.Context) error {
			if trimmer.Tick() {
				b.log.Debug("returned idle heap to the OS")
			}
			return nil
		})
	}
}

// Close is the graceful shutdown of 03 §9.5 with S2; see close for the
// order of its steps.
func (b *broker) Close(ctx context.Context) error {
	b.closeOnce.Do(func() { b.closeErr = b.close(ctx) })
	return b.closeErr
}

// close shuts down in an order that answers every accepted send and
// confirms every written push before a socket closes (S2, M3), so a client
// that answers pings sees no duplicate and no send of its is committed
// without its ack:
//
//  1. stop the listener and the background jobs (no new sockets, no sweeps);
//  2. every socket stops handling new frames and finishes the sends it
//     accepted: their rows commit and their acks are queued;
//  3. no new drains; the running ones finish their pushes;
//  4. every socket writes what is queued, pings, and waits up to
//     ShutdownConfirm for the pong confirming its written pushes;
//  5. the delivered marks those pongs produced are committed;
//  6. presence is settled and every socket is closed with 1001;
//  7. the leases are recorded as held for the next process (the presence
//     rows stay live, S2), what is still in flight is released for the next
//     broker, the writers flush, the owner lock is released, storage closes.
func (b *broker) close(ctx context.Context) error {
	var errs []error
	// 1.
	_ = b.server.StopAccepting(ctx) // its error is Shutdown's too, reported there
	b.stopJobs()
	// 2.
	b.server.StopReading(ctx)
	// 3.
	b.messaging.StopDrains()
	// 4.
	b.server.ConfirmPushes(ctx, b.cfg.ShutdownConfirm)
	// 5.
	if err := b.queue.FlushMarks(ctx); err != nil {
		errs = append(errs, fmt.Errorf("persist delivered marks: %w", err))
	}
	// 6.
	if err := b.presence.Shutdown(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := b.server.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("close sockets: %w", err))
	}
	if err := <-b.served; err != nil {
		errs = append(errs, fmt.Errorf("serve: %w", err))
	}
	if b.admin != nil {
		if err := b.admin.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("admin shutdown: %w", err))
		}
	}
	// 7.
	b.jobs.Wait()
	b.toolbox.Stop()
	b.realtime.Close()
	b.messaging.Stop()
	b.presence.Wait()
	if err := b.presence.HoldForNextProcess(ctx); err != nil {
		errs = append(errs, err)
	}
	b.queue.Stop()
	if err := b.audit.Close(ctx); err != nil {
		errs = append(errs, fmt.Errorf("audit flush: %w", err))
	}
	b.owner.Release()
	if err := b.db.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close database: %w", err))
	}
	return errors.Join(errs...)
}

const usage = `meshbroker: a claudemesh broker.

Usage:
  meshbroker                         serve /ws, /hook/set-status, /health, /metrics
  meshbroker mesh create NAME [--owner-user ID] [--owner-name NAME]
                                     create a mesh and an admin member; prints its identity (with secret key) as JSON
  meshbroker mesh list               list meshes as JSON (id, name, slug, members)
  meshbroker keygen                  print a new ed25519 key pair as JSON (pubkey and secretKey, hex); stores nothing
  meshbroker member add --mesh ID --pubkey HEX --name NAME [--role admin|member]
                                     enroll a key (hex in either case); a revoked key is enrolled again as a new member
  meshbroker member list --mesh ID   list a mesh's members as JSON, revoked ones with revokedAt
  meshbroker member revoke --mesh ID --member ID|PUBKEY
  meshbroker invite create --mesh ID [--role member|admin] [--max-uses N] [--expires 7d|DURATION] [--broker-url WS_URL]
                                     issue an invite; prints {"link":"ic://join/...","code":"...","expiresAt":"..."}
  meshbroker invite list --mesh ID
  meshbroker invite revoke --mesh ID --invite ID|CODE
  meshbroker demo [--out FILE]       create a mesh with two members and write their identities to FILE (default demo-identities.json)
  meshbroker healthcheck             exit 0 if the broker on BROKER_HOST:BROKER_PORT answers /health (0.0.0.0 and :: probe loopback)
  meshbroker --help

`
