package models

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// Waiting for a database that is not up yet.
//
// A broker deployed beside its Postgres (one Fly app next to another, a
// compose file) often starts first. OpenRetrying keeps trying for a bounded
// time instead of exiting on the first refused connection, so the platform
// does not restart-loop it. It runs on the caller's goroutine and waits on
// ctx (a SIGTERM during the wait ends it at once); nothing runs after it
// returns.

// RetryPolicy bounds OpenRetrying: attempts continue until Timeout has
// passed since the first one, pausing Min, then twice as long each time up
// to Max. A zero Timeout means a single attempt.
type RetryPolicy struct {
	Timeout time.Duration
	Min     time.Duration
	Max     time.Duration
}

// OpenRetrying is Open, retried under p while the error may be transient: a
// Postgres server that refuses or drops connections, or is still starting.
// A malformed URL and every embedded-database error fail at once (a file
// that cannot be opened does not get better by waiting). Each failed
// attempt is logged at warn with its number, the error and the pause
// before the next one; giving up returns an error that says how long and
// how many attempts it tried.
func OpenRetrying(ctx context.Context, databaseURL, dataDir string, logger *slog.Logger, opts Options, p RetryPolicy) (*DB, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	start := time.Now()
	deadline := start.Add(p.Timeout)
	pause := max(p.Min, time.Millisecond)
	for attempt := 1; ; attempt++ {
		db, err := OpenWith(ctx, databaseURL, dataDir, logger, opts)
		if err == nil {
			if attempt > 1 {
				logger.Info("database up", "attempt", attempt, "waited_ms", time.Since(start).Milliseconds())
			}
			return db, nil
		}
		if !retryable(databaseURL, err) || ctx.Err() != nil {
			return nil, err
		}
		left := time.Until(deadline)
		if left <= 0 {
			if attempt == 1 {
				return nil, err
			}
			return nil, fmt.Errorf("database not reachable after %d attempts in %s (DB_START_TIMEOUT_MS=%d): %w",
				attempt, time.Since(start).Round(time.Millisecond), p.Timeout.Milliseconds(), err)
		}
		wait := min(pause, left)
		logger.Warn("database not reachable, retrying", "attempt", attempt, "retry_in_ms", wait.Milliseconds(),
			"gives_up_in_ms", left.Milliseconds(), "err", err)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("waiting for the database: %w (last error: %w)", ctx.Err(), err)
		case <-t.C:
		}
		pause = min(pause*2, max(p.Max, p.Min))
	}
}

func retryable(databaseURL string, err error) bool {
	if errors.Is(err, errInvalidURL) {
		return false
	}
	return strings.HasPrefix(databaseURL, "postgres://") || strings.HasPrefix(databaseURL, "postgresql://")
}
