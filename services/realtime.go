package services

import (
	"log/slog"
	"time"

	"meshbroker/config"
	"meshbroker/models"
)

// Realtime owns the in-memory extras whose lifetime follows presence (04
// §2-§9): URL watches, streams, the peer-hosted MCP registry, the mesh
// clock, and shared state in mesh.state.
type Realtime struct{}

// NewRealtime wires the extras to presence's hooks.
func NewRealtime(cfg config.Config, db *models.DB, log *slog.Logger, metrics *Metrics, now func() time.Time, presence *PresenceService, audit Auditor) *Realtime {
	return &Realtime{}
}

// Close stops every timer the extras run (watches, clocks).
func (r *Realtime) Close() {}
