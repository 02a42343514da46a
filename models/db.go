package models

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	sqlite "github.com/libtnb/sqlite"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/schema"
)

// Dialect names the database engine behind a DB.
type Dialect int

const (
	DialectPostgres Dialect = iota + 1 // zero stays invalid so an unset Dialect is caught
	DialectSQLite
)

func (d Dialect) String() string {
	switch d {
	case DialectPostgres:
		return "postgres"
	case DialectSQLite:
		return "sqlite"
	}
	return fmt.Sprintf("Dialect(%d)", int(d))
}

// SQLiteFileName is the database file Open creates under dataDir.
const SQLiteFileName = "meshbroker.db"

// pgSchema is the Postgres schema every table lives in, as in the reference.
const pgSchema = "mesh"

// Pool sizing for Postgres. The broker's hot paths are short statements; a
// bounded pool keeps a burst of sockets from exhausting max_connections that
// the web app shares. Every open connection may stay idle: closing the ones
// above a lower idle cap made each burst reconnect (a backend fork, auth and
// re-preparing statements, 5-10 ms each), which was most of a silent
// reattach's latency under a reconnect storm.
const (
	pgMaxOpenConns    = 20
	pgMaxIdleConns    = pgMaxOpenConns
	pgConnMaxIdleTime = 5 * time.Minute
)

// sqliteBusyTimeout covers other processes holding the file (a backup, the
// sqlite3 shell); within this process the single connection already
// serializes writers.
const sqliteBusyTimeout = 10 * time.Second

// DB is the broker's database handle: gorm for models, plus the dialect so
// services can write the few statements that differ.
//
// Note that DB.Table shadows gorm's chainable Table method; use db.DB.Table
// for the gorm one.
type DB struct {
	*gorm.DB
	Dialect Dialect

	checkpoints *checkpointer // SQLite only: WAL checkpoints off the write path
}

// Open connects to the database. A databaseURL starting with "postgres://" or
// "postgresql://" selects Postgres; an empty one selects the SQLite file
// meshbroker.db under dataDir, creating the directory if needed. Open checks
// that the database answers but does not create tables: call Bootstrap.
func Open(ctx context.Context, databaseURL, dataDir string, logger *slog.Logger) (*DB, error) {
	return OpenWith(ctx, databaseURL, dataDir, logger, Options{})
}

// Options are the storage settings beyond the URL.
type Options struct {
	// SQLiteSynchronous is the embedded database's PRAGMA synchronous:
	// "NORMAL" (the default when empty) or "FULL".
	SQLiteSynchronous string
}

// OpenWith is Open with opts.
func OpenWith(ctx context.Context, databaseURL, dataDir string, logger *slog.Logger, opts Options) (*DB, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case strings.HasPrefix(databaseURL, "postgres://"), strings.HasPrefix(databaseURL, "postgresql://"):
		return openPostgres(ctx, databaseURL, logger)
	case databaseURL == "":
		return openSQLite(ctx, dataDir, logger, opts)
	default:
		// Never echo the URL: it may carry a password.
		return nil, errors.New("open database: DATABASE_URL must start with postgres:// or postgresql://")
	}
}

func gormConfig(d Dialect, logger *slog.Logger) *gorm.Config {
	naming := schema.NamingStrategy{SingularTable: true}
	if d == DialectPostgres {
		naming.TablePrefix = pgSchema + "."
	}
	return &gorm.Config{
		NamingStrategy: naming,
		// A single INSERT is atomic already; gorm's implicit BEGIN/COMMIT would
		// only add two round trips (and on SQLite, hold the one connection longer).
		SkipDefaultTransaction: true,
		PrepareStmt:            d == DialectPostgres,
		// Name the model's columns instead of SELECT *: a column the web app
		// adds later must not change the result shape of statements already
		// prepared ("cached plan must not change result type").
		QueryFields:    true,
		TranslateError: true,
		Logger:         newGormLogger(logger),
		NowFunc:        func() time.Time { return time.Now().UTC().Truncate(time.Microsecond) },
		// Open pings with the caller's context instead.
		DisableAutomaticPing: true,
	}
}

func openPostgres(ctx context.Context, databaseURL string, logger *slog.Logger) (*DB, error) {
	cfg, err := pgx.ParseConfig(databaseURL)
	if err != nil {
		// pgx's message can quote the URL; keep only that it failed to parse.
		return nil, errInvalidURL
	}
	// `DEFAULT now()` on a timestamp-without-time-zone column stores the
	// session's local wall-clock time; pinning the session to UTC makes
	// database defaults agree with the UTC times the broker writes.
	cfg.RuntimeParams["timezone"] = "UTC"
	sqlDB := stdlib.OpenDB(*cfg, stdlib.OptionAfterConnect(registerUTCTimestamp))
	sqlDB.SetMaxOpenConns(pgMaxOpenConns)
	sqlDB.SetMaxIdleConns(pgMaxIdleConns)
	sqlDB.SetConnMaxIdleTime(pgConnMaxIdleTime)

	gdb, err := gorm.Open(postgres.New(postgres.Config{Conn: sqlDB}), gormConfig(DialectPostgres, logger))
	if err != nil {
		sqlDB.Close()
		return nil, fmt.Errorf("open postgres: %w", err)
	}
	db := &DB{DB: gdb, Dialect: DialectPostgres}
	if err := db.Ping(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open postgres: %w", err)
	}
	return db, nil
}

func openSQLite(ctx context.Context, dataDir string, logger *slog.Logger, opts Options) (*DB, error) {
	synchronous := strings.ToUpper(opts.SQLiteSynchronous)
	switch synchronous {
	case "":
		synchronous = "NORMAL"
	case "NORMAL", "FULL":
	default:
		return nil, fmt.Errorf("open sqlite: synchronous must be NORMAL or FULL, not %q", opts.SQLiteSynchronous)
	}
	if dataDir == "" {
		return nil, errors.New("open sqlite: no data directory given")
	}
	if err := os.MkdirAll(dataDir, 0o750); err != nil {
		return nil, fmt.Errorf("open sqlite: create data dir: %w", err)
	}
	path := filepath.Join(dataDir, SQLiteFileName)
	// The driver splits its DSN at the first '?', so such a path cannot be
	// expressed; refuse it rather than open some other file.
	if strings.ContainsRune(path, '?') {
		return nil, fmt.Errorf("open sqlite: data dir %q contains '?'", dataDir)
	}
	dsn := path + "?" + strings.Join([]string{
		fmt.Sprintf("_pragma=busy_timeout(%d)", sqliteBusyTimeout.Milliseconds()),
		"_pragma=journal_mode(WAL)",
		"_pragma=foreign_keys(1)",
		// Checkpoints run on a connection of their own (checkpoint.go).
		"_pragma=wal_autocheckpoint(0)",
		"_pragma=journal_size_limit(67108864)",
		// NORMAL is durable across application crashes in WAL mode; only an OS
		// crash or power loss can drop the last transactions. FULL syncs the
		// WAL at every commit and survives those too (SQLITE_SYNCHRONOUS).
		"_pragma=synchronous(" + synchronous + ")",
		// Take the write lock at BEGIN so two processes on one file never
		// deadlock upgrading read locks; waiting is bounded by busy_timeout.
		"_txlock=immediate",
	}, "&")

	connector, err := newSQLiteConnector(dsn)
	if err != nil {
		return nil, fmt.Errorf("open sqlite: %w", err)
	}
	sqlDB := sql.OpenDB(connector)
	// One connection: writers queue in database/sql instead of meeting
	// SQLITE_BUSY, and the pragmas above apply to the connection that is used.
	sqlDB.SetMaxOpenConns(1)
	sqlDB.SetMaxIdleConns(1)
	sqlDB.SetConnMaxLifetime(0)
	sqlDB.SetConnMaxIdleTime(0)

	gdb, err := gorm.Open(&sqlite.Dialector{Conn: sqlDB}, gormConfig(DialectSQLite, logger))
	if err != nil {
		sqlDB.Close()
		return nil, fmt.Errorf("open sqlite %s: %w", path, err)
	}
	db := &DB{DB: gdb, Dialect: DialectSQLite}
	if err := db.Ping(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open sqlite %s: %w", path, err)
	}
	var mode string
	if err := sqlDB.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil {
		db.Close()
		return nil, fmt.Errorf("open sqlite %s: read journal mode: %w", path, err)
	}
	if !strings.EqualFold(mode, "wal") {
		db.Close()
		return nil, fmt.Errorf("open sqlite %s: journal mode is %q, want wal", path, mode)
	}
	ckConn := sql.OpenDB(connector)
	ckConn.SetMaxOpenConns(1)
	ckConn.SetMaxIdleConns(1)
	if err := ckConn.PingContext(ctx); err != nil {
		ckConn.Close()
		db.Close()
		return nil, fmt.Errorf("open sqlite %s: checkpoint connection: %w", path, err)
	}
	db.checkpoints = startCheckpointer(ckConn, logger)
	return db, nil
}

// errInvalidURL is a DATABASE_URL that no retry can fix.
var errInvalidURL = errors.New("open postgres: DATABASE_URL is not a valid connection URL")

// IsPostgres reports whether db runs on Postgres.
func (db *DB) IsPostgres() bool { return db.Dialect == DialectPostgres }

// Table returns the name to use for table in raw SQL: "mesh.presence" on
// Postgres, "presence" on SQLite. The name is not quoted; every meshbroker
// table name is a plain lower-case identifier.
func (db *DB) Table(name string) string {
	if db.IsPostgres() {
		return pgSchema + "." + name
	}
	return name
}

// SQLDB returns the underlying *sql.DB.
func (db *DB) SQLDB() (*sql.DB, error) {
	sqlDB, err := db.DB.DB()
	if err != nil {
		return nil, fmt.Errorf("%s: underlying sql.DB: %w", db.Dialect, err)
	}
	return sqlDB, nil
}

// Ping checks that the database answers.
func (db *DB) Ping(ctx context.Context) error {
	sqlDB, err := db.SQLDB()
	if err != nil {
		return err
	}
	if err := sqlDB.PingContext(ctx); err != nil {
		return fmt.Errorf("ping %s: %w", db.Dialect, err)
	}
	return nil
}

// Close closes the connection pool. Queries still running fail.
func (db *DB) Close() error {
	sqlDB, err := db.SQLDB()
	if err != nil {
		return err
	}
	var ckErr error
	if db.checkpoints != nil {
		ckErr = db.checkpoints.close()
	}
	if err := sqlDB.Close(); err != nil {
		return fmt.Errorf("close %s: %w", db.Dialect, err)
	}
	if ckErr != nil {
		return fmt.Errorf("close %s checkpoint connection: %w", db.Dialect, ckErr)
	}
	return nil
}
