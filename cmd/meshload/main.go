// Command meshload is the load tool for claudemesh brokers. It reproduces the
// reference load test (02 §13): seed one mesh with N members holding real
// ed25519 keys, open N sockets in batches, have every peer send M direct
// messages with real crypto_box bodies, and correlate ack.id → ack.messageId
// → push.messageId to measure end-to-end and send→ack latency, delivery,
// duplicates and the broker's peak RSS. It speaks only the wire protocol, so
// it can drive any broker that shares the schema it seeds.
//
// Three more modes: --idle N holds N authenticated idle sockets (memory per
// connection), --reattach N puts N leases in grace and measures how fast
// they reattach, and --restart N restarts the broker under N peers and
// measures how fast they all reattach to the new process.
//
// Every mode is bounded in time: a run ends by itself after its drain or
// hold timeout, and exits non-zero if the run failed to set up.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

const usage = `meshload: load tool for claudemesh brokers.

Usage:
  meshload [flags]                  message run: N peers each send M direct messages
  meshload --idle N [flags]         hold N authenticated idle sockets for --hold
  meshload --reattach N [flags]     put N leases in grace, measure their reattach
  meshload --fault kill|term --broker-bin PATH [flags]
                                    run the broker as a child, kill -9 or SIGTERM it under
                                    paced load (--peers senders and --peers non-acking
                                    receivers, --rate msg/s in total), restart it on the
                                    same database, count lost and duplicated messages by id
  meshload --restart N --broker-bin PATH [flags]
                                    start the broker, connect N peers, stop it (SIGTERM or,
                                    with --restart-signal KILL, SIGKILL), start it again and
                                    measure every peer's redial to hello_ack. The broker gets
                                    meshload's environment (DATABASE_URL or DATA_DIR,
                                    BROKER_PORT, LEASE_TTL_MS, MAX_CONNECTIONS_PER_MESH, ...)

Seeding needs the broker's database: --database-url postgres://… (Postgres) or
--data-dir DIR (the SQLite file DIR/meshbroker.db; seed before the broker
opens it, or while it runs: SQLite lets both open the file). Traffic goes to
--url. The broker needs SEND_RATE_LIMIT_PER_MIN=0 and MAX_CONNECTIONS_PER_MESH
above --peers (or --mesh-size in --idle/--reattach).

Example (the reference's peak run):
  meshload --database-url postgres://postgres@127.0.0.1:5432/meshload_x?sslmode=disable \
    --url ws://127.0.0.1:7900/ws --peers 100 --messages 1000 --broker-pid $(pgrep -n mb)

Flags:
`

// options is every flag, parsed once.
type options struct {
	url         string
	databaseURL string
	dataDir     string

	peers          int
	messages       int
	priority       string
	sessions       bool
	broadcastShare float64
	rate           float64
	window         int
	ack            bool
	bodyBytes      int
	verifySample   float64

	batch     int
	batchGap  time.Duration
	drain     time.Duration
	linger    time.Duration
	connectTO time.Duration

	idle     int
	hold     time.Duration
	reattach int
	restart  int
	meshSize int

	brokerBin     string
	restartSignal string
	settle        time.Duration

	brokerPID   int
	metricsURL  string
	rssInterval time.Duration

	fault      string
	brokerEnv  string
	faultAfter time.Duration
	claimLease time.Duration

	json bool
	seed int64
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("meshload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	fs.StringVar(&o.url, "url", "ws://127.0.0.1:7900/ws", "broker WebSocket URL")
	fs.StringVar(&o.databaseURL, "database-url", "", "broker database (postgres://…); empty: SQLite under --data-dir")
	fs.StringVar(&o.dataDir, "data-dir", "", "broker DATA_DIR holding meshbroker.db, when --database-url is empty")

	fs.IntVar(&o.peers, "peers", 100, "peers (members, one socket each)")
	fs.IntVar(&o.messages, "messages", 100, "messages each peer sends")
	fs.StringVar(&o.priority, "priority", "now", "send priority: now, next, low, or none (field omitted)")
	fs.BoolVar(&o.sessions, "sessions", false, "connect with session_hello (a fresh session key per peer) and address session keys")
	fs.Float64Var(&o.broadcastShare, "broadcast-share", 0, "fraction of sends addressed to * (0-1)")
	fs.Float64Var(&o.rate, "rate", 0, "global send rate in msgs/s; 0: each peer sends as fast as it can")
	fs.IntVar(&o.window, "window", 0, "most unacked sends per peer; 0: unlimited, like the reference")
	fs.BoolVar(&o.ack, "ack", false, "answer every push with client_ack (the reference never does)")
	fs.IntVar(&o.bodyBytes, "body-bytes", 96, "plaintext bytes per message before crypto_box")
	fs.Float64Var(&o.verifySample, "verify-sample", 0.01, "fraction of pushes opened with crypto_box after the run (0 disables)")

	fs.IntVar(&o.batch, "batch", 20, "sockets opened per batch")
	fs.DurationVar(&o.batchGap, "batch-gap", 50*time.Millisecond, "pause between connect batches")
	fs.DurationVar(&o.drain, "drain-timeout", 120*time.Second, "how long to wait for acks and pushes after the last send")
	fs.DurationVar(&o.linger, "linger", 2*time.Second, "keep listening this long after everything arrived, to catch late duplicates")
	fs.DurationVar(&o.connectTO, "connect-timeout", 30*time.Second, "dial + hello timeout per socket")

	fs.IntVar(&o.idle, "idle", 0, "idle mode: hold N authenticated idle sockets")
	fs.DurationVar(&o.hold, "hold", 30*time.Second, "idle mode: how long to hold the sockets")
	fs.IntVar(&o.reattach, "reattach", 0, "reattach mode: put N leases in grace and reattach them")
	fs.IntVar(&o.restart, "restart", 0, "restart mode: restart the broker under N peers and reattach them")
	fs.StringVar(&o.brokerBin, "broker-bin", "", "restart and fault modes: the meshbroker binary meshload runs as a child and restarts")
	fs.StringVar(&o.restartSignal, "restart-signal", "TERM", "restart mode: TERM (graceful) or KILL (crash)")
	fs.IntVar(&o.meshSize, "mesh-size", 100, "idle/reattach/restart modes: members per mesh (each join is announced to the whole mesh)")
	fs.DurationVar(&o.settle, "settle", 3*time.Second, "idle/reattach modes: pause before measuring, for the broker to settle")

	fs.IntVar(&o.brokerPID, "broker-pid", 0, "sample this process's VmRSS and open fds from /proc")
	fs.StringVar(&o.metricsURL, "metrics-url", "", "else scrape process_resident_memory_bytes from this Prometheus URL")
	fs.DurationVar(&o.rssInterval, "rss-interval", 200*time.Millisecond, "RSS sampling interval")

	fs.StringVar(&o.fault, "fault", "", "fault mode: kill or term; meshload runs --broker-bin itself, signals it after --fault-after and restarts it")
	fs.StringVar(&o.brokerEnv, "broker-env", "", "fault mode: extra KEY=VALUE settings for the broker, space-separated")
	fs.DurationVar(&o.faultAfter, "fault-after", 6*time.Second, "fault mode: how long the load runs before the signal")
	fs.DurationVar(&o.claimLease, "claim-lease", 3*time.Second, "fault mode: the broker's CLAIM_LEASE_MS, so a killed broker's claims run out soon")
	fs.BoolVar(&o.json, "json", false, "print the summary as one JSON object")
	fs.Int64Var(&o.seed, "seed", 0, "random seed for target choice (0: time-based)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	switch {
	case o.databaseURL == "" && o.dataDir == "":
		return o, fmt.Errorf("one of --database-url or --data-dir is required to seed the mesh")
	case o.databaseURL != "" && !strings.HasPrefix(o.databaseURL, "postgres://") && !strings.HasPrefix(o.databaseURL, "postgresql://"):
		return o, fmt.Errorf("--database-url must start with postgres:// or postgresql://")
	case o.fault != "" && (o.idle > 0 || o.reattach > 0 || o.restart > 0):
		return o, fmt.Errorf("--fault is a mode of its own")
	case o.fault != "" && o.fault != "kill" && o.fault != "term":
		return o, fmt.Errorf("--fault must be kill or term")
	case (o.idle > 0) && (o.reattach > 0) || (o.idle > 0 || o.reattach > 0) && o.restart > 0:
		return o, fmt.Errorf("--idle, --reattach and --restart are separate modes")
	case (o.restart > 0 || o.fault != "") && o.brokerBin == "":
		return o, fmt.Errorf("--restart and --fault need --broker-bin")
	case o.restartSignal != "TERM" && o.restartSignal != "KILL":
		return o, fmt.Errorf("--restart-signal must be TERM or KILL")
	case o.idle == 0 && o.reattach == 0 && o.restart == 0 && o.peers < 2:
		return o, fmt.Errorf("--peers must be at least 2")
	case o.messages < 0:
		return o, fmt.Errorf("--messages must not be negative")
	case o.priority != "now" && o.priority != "next" && o.priority != "low" && o.priority != "none":
		return o, fmt.Errorf("--priority must be now, next, low or none")
	case o.broadcastShare < 0 || o.broadcastShare > 1:
		return o, fmt.Errorf("--broadcast-share must be within 0-1")
	case o.rate < 0 || o.window < 0:
		return o, fmt.Errorf("--rate and --window must not be negative")
	case o.batch < 1 || o.meshSize < 2:
		return o, fmt.Errorf("--batch must be at least 1 and --mesh-size at least 2")
	case o.bodyBytes < 1 || o.bodyBytes > 32768:
		return o, fmt.Errorf("--body-bytes must be within 1-32768")
	}
	if o.seed == 0 {
		o.seed = time.Now().UnixNano()
	}
	return o, nil
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		fmt.Fprintln(stderr, "meshload:", err)
		return 2
	}
	// Ctrl-C ends the run early but still prints what was measured.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	logf := func(format string, a ...any) {
		fmt.Fprintf(stderr, "%s meshload: %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, a...))
	}
	raiseFileLimit(logf)
	switch {
	case o.fault != "":
		err = runFault(ctx, o, stdout, logf)
	case o.idle > 0:
		err = runIdle(ctx, o, stdout, logf)
	case o.reattach > 0:
		err = runReattach(ctx, o, stdout, logf)
	case o.restart > 0:
		err = runRestart(ctx, o, stdout, logf)
	default:
		err = runMessages(ctx, o, stdout, logf)
	}
	if err != nil {
		fmt.Fprintln(stderr, "meshload:", err)
		return 1
	}
	return 0
}

// raiseFileLimit lifts RLIMIT_NOFILE to its hard limit: --idle 10000 needs
// one descriptor per socket.
func raiseFileLimit(logf func(string, ...any)) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		logf("getrlimit: %v", err)
		return
	}
	if lim.Cur >= lim.Max {
		return
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		logf("raise RLIMIT_NOFILE to %d: %v", lim.Max, err)
	}
}
