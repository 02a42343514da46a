// Package modelstest opens real databases for tests: an SQLite file in the
// test's temporary directory by default, or a fresh, uniquely named Postgres
// database when TEST_DATABASE_URL is set, e.g.
//
//	TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test?sslmode=disable
//
// The Postgres database is created on that server and dropped when the test
// ends; the database named in the URL is only used to issue CREATE DATABASE.
package modelstest

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver for the admin connection

	"github.com/claudemesh/meshbroker/models"
)

// EnvDatabaseURL names the variable that selects Postgres for tests.
const EnvDatabaseURL = "TEST_DATABASE_URL"

// setupTimeout bounds creating and dropping a test database.
const setupTimeout = 30 * time.Second

// OpenTestDB returns a bootstrapped, empty database that is closed (and on
// Postgres dropped) when the test ends.
// On SQLite it starts from SeededDataDir, so Bootstrap here takes its path
// for a database that is already complete.
func OpenTestDB(tb testing.TB) *models.DB {
	tb.Helper()
	var db *models.DB
	if os.Getenv(EnvDatabaseURL) != "" {
		db = OpenEmptyDB(tb)
	} else {
		db = openIn(tb, "", SeededDataDir(tb))
	}
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	if err := db.Bootstrap(ctx); err != nil {
		tb.Fatalf("modelstest: %v", err)
	}
	return db
}

// SeededDataDir returns a new temporary directory whose one file is a
// freshly bootstrapped SQLite database (models.SQLiteFileName), for a broker
// or OpenTestDB to open. Bootstrapping is most of the CPU an end-to-end test
// spends under the race detector (every CREATE makes SQLite re-read its
// schema), so the test binary bootstraps once and copies the file. The
// copy is a byte image taken with VACUUM INTO, so nothing is shared between
// tests. Tests of bootstrap itself use OpenEmptyDB.
func SeededDataDir(tb testing.TB) string {
	tb.Helper()
	image, err := sqliteSeed.get()
	if err != nil {
		tb.Fatalf("modelstest: %v", err)
	}
	dir := tb.TempDir()
	if err := os.WriteFile(filepath.Join(dir, models.SQLiteFileName), image, 0o600); err != nil {
		tb.Fatalf("modelstest: seed data dir: %v", err)
	}
	return dir
}

// sqliteSeed is the test binary's bootstrapped database image, built on
// first use. It is never written after that, so tests may share it.
var sqliteSeed seedImage

type seedImage struct {
	once  sync.Once
	image []byte
	err   error
}

func (s *seedImage) get() ([]byte, error) {
	s.once.Do(func() { s.image, s.err = bootstrapImage() })
	return s.image, s.err
}

// bootstrapImage bootstraps a database in a scratch directory and returns
// the bytes of a self-contained copy of it.
func bootstrapImage() ([]byte, error) {
	scratch, err := os.MkdirTemp("", "meshbroker-seed-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(scratch)
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	db, err := models.Open(ctx, "", filepath.Join(scratch, "db"), nil)
	if err != nil {
		return nil, fmt.Errorf("seed: %w", err)
	}
	defer db.Close()
	if err := db.Bootstrap(ctx); err != nil {
		return nil, fmt.Errorf("seed: %w", err)
	}
	image := filepath.Join(scratch, "image.db")
	if err := db.WithContext(ctx).Exec("VACUUM INTO ?", image).Error; err != nil {
		return nil, fmt.Errorf("seed: vacuum into: %w", err)
	}
	return os.ReadFile(image)
}

// OpenEmptyDB is OpenTestDB without Bootstrap: nothing exists yet.
func OpenEmptyDB(tb testing.TB) *models.DB {
	tb.Helper()
	databaseURL := ""
	if os.Getenv(EnvDatabaseURL) != "" {
		databaseURL = FreshPostgresURL(tb)
	}
	return Open(tb, databaseURL)
}

// Open opens databaseURL ("" for SQLite in tb.TempDir()) with a logger that
// writes to the test's output, and closes it when the test ends.
func Open(tb testing.TB, databaseURL string) *models.DB {
	tb.Helper()
	return openIn(tb, databaseURL, tb.TempDir())
}

func openIn(tb testing.TB, databaseURL, dataDir string) *models.DB {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	logger := slog.New(slog.NewTextHandler(tb.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	db, err := models.Open(ctx, databaseURL, dataDir, logger)
	if err != nil {
		tb.Fatalf("modelstest: %v", err)
	}
	tb.Cleanup(func() {
		if err := db.Close(); err != nil {
			tb.Errorf("modelstest: %v", err)
		}
	})
	return db
}

// FreshPostgresURL creates an empty database on the TEST_DATABASE_URL server
// and returns its URL; the database is dropped when the test ends (after
// cleanups registered later, such as closing a DB opened on it). The test is
// skipped when TEST_DATABASE_URL is unset.
func FreshPostgresURL(tb testing.TB) string {
	tb.Helper()
	return createPostgres(tb, "")
}

// BootstrappedPostgresURL is FreshPostgresURL for a database that Bootstrap
// has already run on. With templates enabled (RunWithTemplates) it is a copy
// of a template bootstrapped once per test binary, which saves the schema's
// DDL (about 150 ms a database); otherwise it is a fresh, empty database,
// which whoever opens it bootstraps.
func BootstrappedPostgresURL(tb testing.TB) string {
	tb.Helper()
	if !pgTemplate.enabled.Load() {
		return FreshPostgresURL(tb)
	}
	name, err := pgTemplate.get()
	if err != nil {
		tb.Fatalf("modelstest: %v", err)
	}
	return createPostgres(tb, name)
}

// RunWithTemplates is a TestMain body: it enables BootstrappedPostgresURL's
// template, runs the tests and drops the template afterwards. A package
// whose TestMain does not call it never creates one (nothing could drop it).
func RunWithTemplates(m *testing.M) int {
	pgTemplate.enabled.Store(true)
	code := m.Run()
	if err := pgTemplate.drop(); err != nil {
		fmt.Fprintln(os.Stderr, "modelstest:", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// pgTemplate is the test binary's bootstrapped Postgres template, made on
// first use and dropped by RunWithTemplates.
var pgTemplate templateDB

type templateDB struct {
	enabled atomic.Bool
	once    sync.Once
	name    string
	err     error
}

func (d *templateDB) get() (string, error) {
	d.once.Do(func() { d.name, d.err = makeTemplate() })
	return d.name, d.err
}

func (d *templateDB) drop() error {
	if d.name == "" {
		return nil
	}
	admin, err := sql.Open("pgx", os.Getenv(EnvDatabaseURL))
	if err != nil {
		return fmt.Errorf("drop template: %w", err)
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	if _, err := admin.ExecContext(ctx, `DROP DATABASE IF EXISTS `+d.name+` WITH (FORCE)`); err != nil {
		return fmt.Errorf("drop template %s: %w", d.name, err)
	}
	return nil
}

// makeTemplate creates and bootstraps a database and closes every
// connection to it, so that CREATE DATABASE can copy it.
func makeTemplate() (string, error) {
	base := os.Getenv(EnvDatabaseURL)
	u, err := url.Parse(base)
	if err != nil {
		return "", fmt.Errorf("template: %s is not a URL", EnvDatabaseURL)
	}
	admin, err := sql.Open("pgx", base)
	if err != nil {
		return "", fmt.Errorf("template: %w", err)
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	name := "meshbroker_tmpl_" + strings.ToLower(models.NewID()[:20])
	if _, err := admin.ExecContext(ctx, `CREATE DATABASE `+name); err != nil {
		return "", fmt.Errorf("template: create %s: %w", name, err)
	}
	u.Path = "/" + name
	db, err := models.Open(ctx, u.String(), "", nil)
	if err == nil {
		err = db.Bootstrap(ctx)
		if cerr := db.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		_, _ = admin.ExecContext(ctx, `DROP DATABASE IF EXISTS `+name+` WITH (FORCE)`)
		return "", fmt.Errorf("template: bootstrap %s: %w", name, err)
	}
	return name, nil
}

// createPostgres creates a database (a copy of template, or empty) and
// drops it when the test ends.
func createPostgres(tb testing.TB, template string) string {
	tb.Helper()
	base := os.Getenv(EnvDatabaseURL)
	if base == "" {
		tb.Skipf("modelstest: %s is not set", EnvDatabaseURL)
	}
	u, err := url.Parse(base)
	if err != nil {
		tb.Fatalf("modelstest: %s is not a URL", EnvDatabaseURL)
	}
	admin, err := sql.Open("pgx", base)
	if err != nil {
		tb.Fatalf("modelstest: open admin connection: %v", err)
	}
	name := "meshbroker_test_" + strings.ToLower(models.NewID()[:20])

	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	create := `CREATE DATABASE ` + name
	if template != "" {
		create += ` TEMPLATE ` + template
	}
	// A template's last connection can still be closing on the server
	// ("being accessed by other users"); that passes within moments.
	for attempt := 0; ; attempt++ {
		_, err = admin.ExecContext(ctx, create)
		if err == nil || template == "" || attempt == 50 || !strings.Contains(err.Error(), "being accessed by other users") {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		admin.Close()
		tb.Fatalf("modelstest: create database %s: %v", name, err)
	}
	tb.Cleanup(func() {
		defer admin.Close()
		ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
		defer cancel()
		// Cut any connection a test leaked, then drop. WITH (FORCE) would do
		// both, but terminating first keeps the error, if any, about the drop.
		_, _ = admin.ExecContext(ctx,
			`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`, name)
		if _, err := admin.ExecContext(ctx, `DROP DATABASE IF EXISTS `+name+` WITH (FORCE)`); err != nil {
			tb.Errorf("modelstest: drop database %s: %v", name, err)
		}
	})

	u.Path = "/" + name
	return u.String()
}

// MustExec runs a raw statement on db, failing the test on error.
func MustExec(tb testing.TB, db *models.DB, query string, args ...any) {
	tb.Helper()
	if err := db.Exec(query, args...).Error; err != nil {
		tb.Fatalf("modelstest: exec %q: %v", query, err)
	}
}
