// Package config turns the process environment into a validated Config.
//
// Every knob the broker reads from the environment is declared once in the
// vars table below, with its default and what it accepts, so that validation,
// `meshbroker --help` and the README cannot drift apart. Every duration the
// services use lives in Config too, also the ones no environment variable
// sets, so that tests can shrink grace windows and sweeper intervals to
// milliseconds instead of sleeping.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// Config is everything the broker needs to know before it starts. The zero
// value is not useful; start from Default or Load.
type Config struct {
	// Network.
	Host string // BROKER_HOST, default 0.0.0.0
	Port int    // BROKER_PORT, default 7900; 0 picks a free port (tests)
	// ClientIPHeader (CLIENT_IP_HEADER, canonical form) names the header a
	// trusted proxy sets to the client's address (Fly-Client-IP). It is the
	// client address of every route that keys on one: the hook routes'
	// per-address limit and the member routes' live-session proof. Empty:
	// the TCP peer.
	ClientIPHeader string

	// Storage.
	DatabaseURL string // DATABASE_URL; empty means embedded SQLite under DataDir
	DataDir     string // DATA_DIR, default ./data

	// Limits.
	MaxConnectionsPerMesh int // MAX_CONNECTIONS_PER_MESH, default 100
	MaxMessageBytes       int // MAX_MESSAGE_BYTES, default 65536: WS frame cap, send size cap, HTTP body cap
	HookRateLimitPerMin   int // HOOK_RATE_LIMIT_PER_MIN, default 30: hook bucket capacity and refill per minute
	HookAddrRateLimit     int // HOOK_RATE_LIMIT_PER_ADDR_PER_MIN, default 600: the same per remote address (IPv6: per /64), checked first
	HookPendingMax        int // HOOK_PENDING_MAX, default 1000: pending_status rows at most; more parked hooks are 429
	SendRateBurst         int // SEND_RATE_BURST, default 10: send bucket capacity per member
	SendRatePerMin        int // SEND_RATE_LIMIT_PER_MIN, default 60; 0 disables the send limiter
	OutboxFrames          int // frames buffered per socket before it counts as a slow consumer, default 1024

	// Status model (03 §2, §5).
	StatusTTL            time.Duration // STATUS_TTL_SECONDS, default 60 s: stuck `working` flips to idle
	HookFreshWindow      time.Duration // HOOK_FRESH_WINDOW_SECONDS, default 30 s
	StatusSweepInterval  time.Duration // default 15 s: how often the TTL sweeper runs
	PendingStatusTTL     time.Duration // default 10 s: a parked hook status applies to hellos this young
	PendingSweepInterval time.Duration // default 10 s

	// Handshake and liveness (01 §7).
	HelloTimeout time.Duration // HELLO_TIMEOUT_MS, default 10 s: unauthenticated sockets are closed after it
	HelloSkew    time.Duration // default 60 s: accepted |now - hello.timestamp|
	MaxAttestTTL time.Duration // default 24 h: furthest accepted attestation expiry
	PingInterval time.Duration // default 30 s: broker pings each online socket this often
	PongTimeout  time.Duration // default 75 s: no pong for this long and the socket is terminated
	WriteWait    time.Duration // default 10 s: one socket write may take this long
	LeaseTTL     time.Duration // LEASE_TTL_MS, default 90 s: offline lease (grace) after a socket drops
	// CleanCloseLease (CLEAN_CLOSE_LEASE_MS, default 2 s, 0 allowed) is the
	// grace of a member presence whose client closed its socket itself with
	// 1000, 1001 or an empty close frame: the client said it is done, so
	// the presence ends after this instead of LeaseTTL (capped by it).
	CleanCloseLease time.Duration
	StaleSweep      time.Duration // default 30 s: DB stale-presence sweeper interval
	StaleThreshold  time.Duration // default 90 s: rows with last_ping_at older than this are marked disconnected
	LeaseFlush      time.Duration // default 250 ms: changed leases (meshbroker_lease) are rewritten in one batch this often

	// Queue (02 §5).
	ClaimLease        time.Duration // CLAIM_LEASE_MS, default 30 s: a claimed row is invisible to other drains this long
	ClaimReapInterval time.Duration // CLAIM_REAP_INTERVAL_MS, default 15 s
	// PushConfirmDelay is how soon after writing a queue push a socket pings
	// to learn that the push arrived (M3): the pong is the proof that marks
	// a non-acking client's row delivered.
	PushConfirmDelay time.Duration // PUSH_CONFIRM_MS, default 50 ms
	// DeliveredFlush is the group-commit interval of delivered marks: a
	// crash replays at most the pushes confirmed within it (M3).
	DeliveredFlush      time.Duration // DELIVERED_FLUSH_MS, default 20 ms, at most 100 ms
	OrphanSweepInterval time.Duration // default 1 h
	OrphanAge           time.Duration // default 7 days: undelivered rows older than this are deleted
	QueueDepthInterval  time.Duration // default 30 s: broker_queue_depth refresh
	RateLimitGCInterval time.Duration // default 30 s: token buckets that have refilled completely are dropped
	MemberCacheTTL      time.Duration // default 5 s: how stale cached peer grants may be

	// Operations.
	DBHealthInterval  time.Duration // default 30 s between health pings while healthy
	GCPercent         int           // GOGC, default 50 (the runtime's is 100); -1: off
	MemoryTrimEvery   time.Duration // default 30 s: a quiet broker returns a burst's memory to the OS (0: never)
	MemoryTrimMin     uint64        // default 16 MiB: the least a trim must reclaim to be done
	ShutdownTimeout   time.Duration // SHUTDOWN_TIMEOUT_MS, default 10 s: the whole graceful shutdown must fit in it
	ShutdownConfirm   time.Duration // SHUTDOWN_CONFIRM_MS, default 1 s: how long shutdown waits for pongs confirming written pushes
	GitSHA            string        // GIT_SHA, surfaced on /health
	ExpectedSchema    string        // EXPECTED_MIGRATION: /health/ready is 503 until this schema version is recorded
	LogLevel          slog.Level    // LOG_LEVEL: debug, info, warn, error; default info
	DBStartTimeout    time.Duration // DB_START_TIMEOUT_MS, default 60 s: how long start retries a database that does not answer (0: once)
	DBRetryMin        time.Duration // default 250 ms: first pause between start attempts (doubles, capped at DBRetryMax)
	DBRetryMax        time.Duration // default 5 s
	AdminAddr         string        // ADMIN_ADDR: net/http/pprof listener; empty: none
	SQLiteSynchronous string        // SQLITE_SYNCHRONOUS: NORMAL (default) or FULL

	// Extras (04).
	WatchAllowPrivate bool   // WATCH_ALLOW_PRIVATE, default false: URL watches may reach private addresses
	ResumeTokenKey    string // RESUME_TOKEN_KEY: 64 hex (ed25519 seed); empty means generated and persisted

	// Member HTTP routes.
	MemberAPISessionAuth bool // MEMBER_API_SESSION_AUTH, default true: unsigned member-route calls count if a live session of the member comes from the caller's address

	// Shared toolbox limits (TOOLBOX_*).
	Toolbox Toolbox

	// Warnings are what Load accepted but the operator should change (a
	// deprecated variable name); the broker logs each at start.
	Warnings []string
}

// Default returns the reference defaults.
func Default() Config {
	return Config{
		Host:                  "0.0.0.0",
		Port:                  7900,
		DataDir:               "./data",
		MaxConnectionsPerMesh: 100,
		MaxMessageBytes:       65536,
		MemberAPISessionAuth:  true,
		HookRateLimitPerMin:   30,
		HookAddrRateLimit:     600,
		HookPendingMax:        1000,
		SendRateBurst:         10,
		SendRatePerMin:        60,
		OutboxFrames:          1024,

		StatusTTL:            60 * time.Second,
		HookFreshWindow:      30 * time.Second,
		StatusSweepInterval:  15 * time.Second,
		PendingStatusTTL:     10 * time.Second,
		PendingSweepInterval: 10 * time.Second,

		HelloTimeout:    10 * time.Second,
		HelloSkew:       60 * time.Second,
		MaxAttestTTL:    24 * time.Hour,
		PingInterval:    30 * time.Second,
		PongTimeout:     75 * time.Second,
		WriteWait:       10 * time.Second,
		LeaseTTL:        90 * time.Second,
		CleanCloseLease: 2 * time.Second,
		StaleSweep:      30 * time.Second,
		StaleThreshold:  90 * time.Second,
		LeaseFlush:      250 * time.Millisecond,

		ClaimLease:          30 * time.Second,
		ClaimReapInterval:   15 * time.Second,
		PushConfirmDelay:    50 * time.Millisecond,
		DeliveredFlush:      20 * time.Millisecond,
		OrphanSweepInterval: time.Hour,
		OrphanAge:           7 * 24 * time.Hour,
		QueueDepthInterval:  30 * time.Second,
		RateLimitGCInterval: 30 * time.Second,
		MemberCacheTTL:      5 * time.Second,

		DBHealthInterval:  30 * time.Second,
		GCPercent:         50,
		MemoryTrimEvery:   30 * time.Second,
		MemoryTrimMin:     16 << 20,
		ShutdownTimeout:   10 * time.Second,
		ShutdownConfirm:   time.Second,
		GitSHA:            "",
		LogLevel:          slog.LevelInfo,
		Toolbox:           DefaultToolbox(),
		DBStartTimeout:    60 * time.Second,
		DBRetryMin:        250 * time.Millisecond,
		DBRetryMax:        5 * time.Second,
		SQLiteSynchronous: "NORMAL",
	}
}

// KnownSchemaVersions lists the meshbroker_schema versions this build
// writes (models.SchemaVersion), for EXPECTED_MIGRATION's help.
const KnownSchemaVersions = "0001_meshbroker_ref0029"

// UnknownGitSHA is what /health and the start line say when GIT_SHA is unset.
const UnknownGitSHA = "unknown"

// BuildRevision is GIT_SHA, or UnknownGitSHA when it is unset: one
// representation for /health, the start line and build_info.
func (c Config) BuildRevision() string {
	if c.GitSHA == "" {
		return UnknownGitSHA
	}
	return c.GitSHA
}

// adminAddr turns ADMIN_ADDR into a listen address: a bare port is bound to
// loopback, so profiling is never exposed by accident.
func adminAddr(v string) (string, error) {
	if n, err := strconv.Atoi(v); err == nil {
		if n < 1 || n > 65535 {
			return "", errBad
		}
		return net.JoinHostPort("127.0.0.1", v), nil
	}
	host, port, err := net.SplitHostPort(v)
	if err != nil {
		return "", err
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return "", errBad
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

// ProbeHost is the address a local health probe should connect to: Host,
// or loopback when the broker listens on every address.
func (c Config) ProbeHost() string {
	switch c.Host {
	case "", "0.0.0.0":
		return "127.0.0.1"
	case "::", "[::]":
		return "::1"
	}
	return strings.Trim(c.Host, "[]")
}

// Addr is the listen address.
func (c Config) Addr() string {
	return net.JoinHostPort(strings.Trim(c.Host, "[]"), strconv.Itoa(c.Port))
}

// envVar is one environment variable: its name, what --help says about it,
// and how it lands in Config.
type envVar struct {
	name    string
	accepts string // shown in --help and in the error for a bad value
	help    string
	def     func(Config) string
	set     func(*Config, string) error
}

var errBad = errors.New("bad value")

// intIn accepts an integer in [lo, hi]. Every numeric variable has a
// range: a value that parses but cannot work (MAX_MESSAGE_BYTES=10 makes
// every hello too large) is refused at start, not discovered by a client.
func intIn(lo, hi int, dst func(*Config) *int) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < lo || n > hi {
			return errBad
		}
		*dst(c) = n
		return nil
	}
}

// durationIn accepts a whole number of units in [lo, hi].
func durationIn(unit time.Duration, lo, hi int64, dst func(*Config) *time.Duration) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < lo || n > hi {
			return errBad
		}
		*dst(c) = time.Duration(n) * unit
		return nil
	}
}

func showInt(get func(Config) int) func(Config) string {
	return func(c Config) string { return strconv.Itoa(get(c)) }
}

func showDuration(unit time.Duration, get func(Config) time.Duration) func(Config) string {
	return func(c Config) string { return strconv.FormatInt(int64(get(c)/unit), 10) }
}

// vars is the one table of environment variables.
var vars = []envVar{
	{name: "BROKER_PORT", accepts: "an integer 0-65535", help: "HTTP and WebSocket port (/ws, /hook/set-status, /health, /metrics)",
		def: showInt(func(c Config) int { return c.Port }),
		set: func(c *Config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > 65535 {
				return errBad
			}
			c.Port = n
			return nil
		}},
	{name: "BROKER_HOST", accepts: "an IP address or host name", help: "listen address",
		def: func(c Config) string { return c.Host },
		set: func(c *Config, v string) error {
			if strings.ContainsAny(v, " /") {
				return errBad
			}
			c.Host = v
			return nil
		}},
	{name: "DATABASE_URL", accepts: "a URL starting with postgres:// or postgresql://", help: "Postgres database (mesh schema); unset: embedded SQLite under DATA_DIR",
		def: func(Config) string { return "" },
		set: func(c *Config, v string) error {
			if !strings.HasPrefix(v, "postgres://") && !strings.HasPrefix(v, "postgresql://") {
				return errBad
			}
			c.DatabaseURL = v
			return nil
		}},
	{name: "DATA_DIR", accepts: "a directory path", help: "where the embedded SQLite database lives when DATABASE_URL is unset",
		def: func(c Config) string { return c.DataDir },
		set: func(c *Config, v string) error { c.DataDir = v; return nil }},
	{name: "STATUS_TTL_SECONDS", accepts: "an integer 1-86400 (seconds)", help: "a `working` status older than this flips to idle",
		def: showDuration(time.Second, func(c Config) time.Duration { return c.StatusTTL }),
		set: durationIn(time.Second, 1, 86400, func(c *Config) *time.Duration { return &c.StatusTTL })},
	{name: "HOOK_FRESH_WINDOW_SECONDS", accepts: "an integer 1-86400 (seconds)", help: "how long a hook-reported status beats inference",
		def: showDuration(time.Second, func(c Config) time.Duration { return c.HookFreshWindow }),
		set: durationIn(time.Second, 1, 86400, func(c *Config) *time.Duration { return &c.HookFreshWindow })},
	{name: "MAX_CONNECTIONS_PER_MESH", accepts: "an integer 1-1000000", help: "registry entries (online and in grace) per mesh",
		def: showInt(func(c Config) int { return c.MaxConnectionsPerMesh }),
		set: intIn(1, 1_000_000, func(c *Config) *int { return &c.MaxConnectionsPerMesh })},
	{name: "MAX_MESSAGE_BYTES", accepts: "an integer 4096-67108864 (bytes; a hello alone needs about 1 KB)", help: "largest WebSocket frame, send payload and HTTP body",
		def: showInt(func(c Config) int { return c.MaxMessageBytes }),
		set: intIn(4096, 64<<20, func(c *Config) *int { return &c.MaxMessageBytes })},
	{name: "HOOK_RATE_LIMIT_PER_MIN", accepts: "an integer 1-1000000", help: "hook requests per (pid, cwd) per minute",
		def: showInt(func(c Config) int { return c.HookRateLimitPerMin }),
		set: intIn(1, 1_000_000, func(c *Config) *int { return &c.HookRateLimitPerMin })},
	{name: "HOOK_RATE_LIMIT_PER_ADDR_PER_MIN", accepts: "an integer 1-1000000", help: "hook requests per remote address (IPv6: per /64) per minute, checked before the per-(pid, cwd) limit",
		def: showInt(func(c Config) int { return c.HookAddrRateLimit }),
		set: intIn(1, 1_000_000, func(c *Config) *int { return &c.HookAddrRateLimit })},
	{name: "HOOK_PENDING_MAX", accepts: "an integer 1-1000000", help: "most parked hook statuses (pending_status rows); a hook that would park one more is answered 429",
		def: showInt(func(c Config) int { return c.HookPendingMax }),
		set: intIn(1, 1_000_000, func(c *Config) *int { return &c.HookPendingMax })},
	{name: "SEND_RATE_LIMIT_PER_MIN", accepts: "an integer 0-1000000; 0 disables the limiter", help: "sends per member per minute (refill rate)",
		def: showInt(func(c Config) int { return c.SendRatePerMin }),
		set: intIn(0, 1_000_000, func(c *Config) *int { return &c.SendRatePerMin })},
	{name: "SEND_RATE_BURST", accepts: "an integer 1-1000000", help: "send bucket capacity per member",
		def: showInt(func(c Config) int { return c.SendRateBurst }),
		set: intIn(1, 1_000_000, func(c *Config) *int { return &c.SendRateBurst })},
	{name: "LEASE_TTL_MS", accepts: "an integer 10-86400000 (milliseconds)", help: "offline lease after a socket drops; a reconnect inside it is silent",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.LeaseTTL }),
		set: durationIn(time.Millisecond, 10, 86_400_000, func(c *Config) *time.Duration { return &c.LeaseTTL })},
	{name: "CLEAN_CLOSE_LEASE_MS", accepts: "an integer 0-60000 (milliseconds)", help: "grace of a member presence whose client closed its socket normally (1000/1001/no code); 0 ends it at once; never longer than LEASE_TTL_MS",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.CleanCloseLease }),
		set: durationIn(time.Millisecond, 0, 60_000, func(c *Config) *time.Duration { return &c.CleanCloseLease })},
	{name: "HELLO_TIMEOUT_MS", accepts: "an integer 10-600000 (milliseconds)", help: "a socket without a completed hello is closed after this",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.HelloTimeout }),
		set: durationIn(time.Millisecond, 10, 600_000, func(c *Config) *time.Duration { return &c.HelloTimeout })},
	{name: "CLAIM_LEASE_MS", accepts: "an integer 100-3600000 (milliseconds)", help: "a claimed queue row is invisible to other drains this long; an unconfirmed push is pushed again after it",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.ClaimLease }),
		set: durationIn(time.Millisecond, 100, 3_600_000, func(c *Config) *time.Duration { return &c.ClaimLease })},
	{name: "CLAIM_REAP_INTERVAL_MS", accepts: "an integer 10-600000 (milliseconds)", help: "how often expired claims are resolved and their targets drained again",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.ClaimReapInterval }),
		set: durationIn(time.Millisecond, 10, 600_000, func(c *Config) *time.Duration { return &c.ClaimReapInterval })},
	{name: "PUSH_CONFIRM_MS", accepts: "an integer 1-10000 (milliseconds)", help: "a socket pings this soon after a push; the pong confirms the push (M3)",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.PushConfirmDelay }),
		set: durationIn(time.Millisecond, 1, 10_000, func(c *Config) *time.Duration { return &c.PushConfirmDelay })},
	{name: "DELIVERED_FLUSH_MS", accepts: "an integer 1-100 (milliseconds)", help: "group-commit interval of delivered marks: a crash replays at most this much confirmed traffic",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.DeliveredFlush }),
		set: func(c *Config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 100 {
				return errBad
			}
			c.DeliveredFlush = time.Duration(n) * time.Millisecond
			return nil
		}},
	{name: "SHUTDOWN_TIMEOUT_MS", accepts: "an integer 100-600000 (milliseconds)", help: "the whole graceful shutdown (SIGTERM) must fit in this",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.ShutdownTimeout }),
		set: durationIn(time.Millisecond, 100, 600_000, func(c *Config) *time.Duration { return &c.ShutdownTimeout })},
	{name: "SHUTDOWN_CONFIRM_MS", accepts: "an integer 1-60000 (milliseconds)", help: "at shutdown, how long to wait for pongs confirming written pushes before closing sockets",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.ShutdownConfirm }),
		set: durationIn(time.Millisecond, 1, 60_000, func(c *Config) *time.Duration { return &c.ShutdownConfirm })},
	{name: "WATCH_ALLOW_PRIVATE", accepts: "true or false", help: "let URL watches reach loopback, private and link-local addresses",
		def: func(c Config) string { return strconv.FormatBool(c.WatchAllowPrivate) },
		set: func(c *Config, v string) error {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return errBad
			}
			c.WatchAllowPrivate = b
			return nil
		}},
	{name: "MEMBER_API_SESSION_AUTH", accepts: "true or false", help: "accept an unsigned member-route call (the claudemesh CLI signs none) from the address of one of the member's live sessions",
		def: func(c Config) string { return strconv.FormatBool(c.MemberAPISessionAuth) },
		set: func(c *Config, v string) error {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return errBad
			}
			c.MemberAPISessionAuth = b
			return nil
		}},
	{name: "CLIENT_IP_HEADER", accepts: "an HTTP header name (an RFC 9110 token: letters, digits and !#$%&'*+-.^_`|~)",
		help: "header a trusted proxy sets to the client's address (Fly.io: Fly-Client-IP), for the hook routes' per-address limit and the member routes' live-session proof; set it only behind a proxy that overwrites it; unset: the TCP peer address",
		def:  func(Config) string { return "" },
		set: func(c *Config, v string) error {
			if !httpguts.ValidHeaderFieldName(v) {
				return errBad
			}
			c.ClientIPHeader = textproto.CanonicalMIMEHeaderKey(v)
			return nil
		}},
	{name: "RESUME_TOKEN_KEY", accepts: "64 hex characters (an ed25519 seed)", help: "signs resume tokens; unset: generated once and kept in the database",
		def: func(Config) string { return "" },
		set: func(c *Config, v string) error {
			if len(v) != 64 || strings.Trim(strings.ToLower(v), "0123456789abcdef") != "" {
				return errBad
			}
			c.ResumeTokenKey = strings.ToLower(v)
			return nil
		}},
	// The versions are those models.SchemaVersion has had; a root test keeps
	// this list in step with it.
	{name: "EXPECTED_MIGRATION", accepts: "a schema version string; this build records " + KnownSchemaVersions, help: "/health/ready answers 503 until this version is in meshbroker_schema (set it to the version a deploy needs)",
		def: func(Config) string { return "" },
		set: func(c *Config, v string) error { c.ExpectedSchema = v; return nil }},
	{name: "DB_START_TIMEOUT_MS", accepts: "an integer 0-3600000 (milliseconds); 0 tries once", help: "how long start keeps retrying, with backoff, a database that does not answer yet",
		def: showDuration(time.Millisecond, func(c Config) time.Duration { return c.DBStartTimeout }),
		set: func(c *Config, v string) error {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 || n > 3_600_000 {
				return errBad
			}
			c.DBStartTimeout = time.Duration(n) * time.Millisecond
			return nil
		}},
	{name: "SQLITE_SYNCHRONOUS", accepts: "NORMAL or FULL", help: "embedded database durability: NORMAL survives a crash of the process, FULL also one of the machine (slower commits)",
		def: func(c Config) string { return c.SQLiteSynchronous },
		set: func(c *Config, v string) error {
			switch u := strings.ToUpper(v); u {
			case "NORMAL", "FULL":
				c.SQLiteSynchronous = u
				return nil
			}
			return errBad
		}},
	{name: "ADMIN_ADDR", accepts: "a port 1-65535, or host:port; a bare port listens on 127.0.0.1", help: "serve net/http/pprof on this separate listener (never on BROKER_PORT); unset: off",
		def: func(Config) string { return "" },
		set: func(c *Config, v string) error {
			addr, err := adminAddr(v)
			if err != nil {
				return errBad
			}
			c.AdminAddr = addr
			return nil
		}},
	{name: "GIT_SHA", accepts: "any string", help: "build revision shown on /health and in the start line",
		def: func(Config) string { return "" },
		set: func(c *Config, v string) error { c.GitSHA = v; return nil }},
	// The broker's working set is mostly short-lived frames and rows, so a
	// tighter collector target costs little: at 50 a 100 x 1,000 burst
	// peaked at 121 MB RSS instead of 154 MB, for about a sixth of the
	// unpaced throughput, and an idle socket costs 14.7 KB instead of 19.1.
	{name: "GOGC", accepts: "an integer 1-10000 (percent) or off", help: "garbage collector target, as for any Go program; the broker's default is 50",
		def: func(c Config) string {
			if c.GCPercent < 0 {
				return "off"
			}
			return strconv.Itoa(c.GCPercent)
		},
		set: func(c *Config, v string) error {
			if strings.EqualFold(v, "off") {
				c.GCPercent = -1
				return nil
			}
			return intIn(1, 10_000, func(c *Config) *int { return &c.GCPercent })(c, v)
		}},
	{name: "LOG_LEVEL", accepts: "debug, info, warn or error", help: "lowest level logged (JSON lines on stderr)",
		def: func(c Config) string { return strings.ToLower(c.LogLevel.String()) },
		set: func(c *Config, v string) error {
			var l slog.Level
			if err := l.UnmarshalText([]byte(v)); err != nil {
				return errBad
			}
			c.LogLevel = l
			return nil
		}},
}

// renamed lists the old names still read, each for the variable of vars
// that replaced it, so that an operator's setting is not silently lost:
// alone it is used (with a warning to rename it), beside the new name it
// must agree with it or the broker refuses to start.
var renamed = []struct {
	old, current string
	same         func(a, b string) bool // whether two raw values mean the same
}{
	// Before HOOK_CLIENT_IP_HEADER and CLIENT_IP_HEADER were merged, the
	// first applied to the hook routes only. Header names ignore case.
	{old: "HOOK_CLIENT_IP_HEADER", current: "CLIENT_IP_HEADER", same: strings.EqualFold},
}

// Load reads every variable through getenv (os.Getenv in production, a map
// in tests). An unset or empty variable keeps its default. The first bad
// value stops loading with an error naming the variable and what it accepts.
func Load(getenv func(string) string) (Config, error) {
	c := Default()
	for _, v := range allVars() {
		name, raw := v.name, strings.TrimSpace(getenv(v.name))
		for _, r := range renamed {
			if r.current != v.name {
				continue
			}
			oldRaw := strings.TrimSpace(getenv(r.old))
			switch {
			case oldRaw == "":
			case raw == "":
				name, raw = r.old, oldRaw
				c.Warnings = append(c.Warnings, fmt.Sprintf("%s is deprecated: rename it to %s (read as %s=%q)", r.old, r.current, r.current, oldRaw))
			case !r.same(raw, oldRaw):
				return Config{}, fmt.Errorf("%s=%q and %s=%q disagree: %s is the deprecated name of %s; unset it", r.current, raw, r.old, oldRaw, r.old, r.current)
			default:
				c.Warnings = append(c.Warnings, fmt.Sprintf("%s is deprecated and repeats %s: remove it", r.old, r.current))
			}
		}
		if raw == "" {
			continue
		}
		if err := v.set(&c, raw); err != nil {
			return Config{}, fmt.Errorf("%s=%q is invalid: expected %s", name, raw, v.accepts)
		}
	}
	return c, nil
}

// Usage is the environment part of `meshbroker --help`.
func Usage() string {
	var b strings.Builder
	d := Default()
	b.WriteString("Environment variables (default in brackets):\n")
	for _, v := range allVars() {
		def := v.def(d)
		if def == "" {
			def = "unset"
		}
		fmt.Fprintf(&b, "  %-26s %s [%s]\n  %-26s accepts %s\n", v.name, v.help, def, "", v.accepts)
	}
	b.WriteString("Deprecated names, still read (rename them):\n")
	for _, r := range renamed {
		fmt.Fprintf(&b, "  %-26s now %s; both set and different: refused\n", r.old, r.current)
	}
	return b.String()
}
