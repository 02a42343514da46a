package services

// Realtime owns the in-memory extras whose lifetime follows presence (04
// §2-§9): URL watches, streams, the peer-hosted MCP registry, the mesh
// clock, and shared state in mesh.state.
type Realtime struct{}

// NewRealtime wires the extras to presence's eviction hooks.
func NewRealtime(p *PresenceService) *Realtime { return &Realtime{} }
