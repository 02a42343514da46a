package models

import "time"

// AuditLog is a row of mesh.audit_log (the shape of migration 0021): an
// append-only, per-mesh hash chain of metadata events.
type AuditLog struct {
	// ID is `integer GENERATED ALWAYS AS IDENTITY` on Postgres and INTEGER
	// PRIMARY KEY AUTOINCREMENT on SQLite; it orders the chain, and the
	// database assigns it (an explicit value is refused on Postgres).
	ID     int64  `gorm:"column:id;primaryKey;autoIncrement"`
	MeshID string `gorm:"column:mesh_id"`
	// EventType names the event, e.g. "peer_joined", "message_sent".
	EventType string `gorm:"column:event_type"`
	// ActorMemberID is a member id; deliberately no foreign key.
	ActorMemberID *string `gorm:"column:actor_member_id"`
	// ActorDisplayName is not covered by the hash.
	ActorDisplayName *string `gorm:"column:actor_display_name"`
	// Payload is NOT NULL, default {}.
	Payload   JSON      `gorm:"column:payload;default:'{}'"`
	PrevHash  string    `gorm:"column:prev_hash"`
	Hash      string    `gorm:"column:hash"`
	CreatedAt time.Time `gorm:"column:created_at;default:now();autoCreateTime:false"`
}
