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
	"log/slog"
	"net/url"
	"os"
	"strings"
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
func OpenTestDB(tb testing.TB) *models.DB {
	tb.Helper()
	db := OpenEmptyDB(tb)
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	if err := db.Bootstrap(ctx); err != nil {
		tb.Fatalf("modelstest: %v", err)
	}
	return db
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
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	logger := slog.New(slog.NewTextHandler(tb.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	db, err := models.Open(ctx, databaseURL, tb.TempDir(), logger)
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
	if _, err := admin.ExecContext(ctx, `CREATE DATABASE `+name); err != nil {
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
