package services

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/claudemesh/meshbroker/models"
)

// HealthService pings the database in the background and caches the
// answer, so /health costs no query (03 §8.4).
//
// Concurrency: healthy is an atomic written only by Run's goroutine.
type HealthService struct {
	db       *models.DB
	log      *slog.Logger
	metrics  *Metrics
	interval time.Duration
	healthy  atomic.Bool
}

// NewHealthService makes the health loop; Run starts it.
func NewHealthService(db *models.DB, log *slog.Logger, metrics *Metrics, interval time.Duration) *HealthService {
	return &HealthService{db: db, log: log.With("svc", "health"), metrics: metrics, interval: interval}
}

// Healthy is the last ping's result ("down" until the first ping succeeds).
func (h *HealthService) Healthy() bool { return h.healthy.Load() }

// Check pings once and records the result.
func (h *HealthService) Check(ctx context.Context) bool {
	ok, _ := h.check(ctx)
	return ok
}

func (h *HealthService) check(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := h.db.Ping(ctx)
	ok := err == nil
	h.healthy.Store(ok)
	if ok {
		h.metrics.DBHealthy.Set(1)
	} else {
		h.metrics.DBHealthy.Set(0)
	}
	return ok, err
}

// Run pings every interval while healthy and backs off from 500 ms (capped
// at the interval) while not, until ctx ends.
func (h *HealthService) Run(ctx context.Context) {
	failures := 0
	for {
		wait := h.interval
		ok, err := h.check(ctx)
		if ctx.Err() != nil {
			return
		}
		if ok {
			if failures > 0 {
				h.log.Info("db healthy", "prior_failures", failures)
			}
			failures = 0
		} else {
			if failures == 0 {
				h.log.Warn("db ping failed", "consecutive_failures", 1, "err", err)
			}
			failures++
			wait = min(h.interval, 500*time.Millisecond<<min(failures, 6))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}
