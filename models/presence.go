package models

import "time"

// Presence is a row of mesh.presence: one WebSocket session of a member.
// A row is live while DisconnectedAt is nil.
type Presence struct {
	ID              string               `gorm:"column:id;primaryKey"`
	MemberID        string               `gorm:"column:member_id"`
	SessionID       string               `gorm:"column:session_id"`
	SessionPubkey   *string              `gorm:"column:session_pubkey"`
	DisplayName     *string              `gorm:"column:display_name"`
	PID             int32                `gorm:"column:pid"`
	Cwd             string               `gorm:"column:cwd"`
	Status          PresenceStatus       `gorm:"column:status;default:idle"`
	StatusSource    PresenceStatusSource `gorm:"column:status_source;default:jsonl"`
	StatusUpdatedAt time.Time            `gorm:"column:status_updated_at;default:now()"`
	Summary         *string              `gorm:"column:summary"`
	// Groups is a JSON array of {name, role?}; nullable, default [].
	Groups         JSON         `gorm:"column:groups;default:'[]'"`
	Role           PresenceRole `gorm:"column:role;default:session"`
	ConnectedAt    time.Time    `gorm:"column:connected_at;default:now()"`
	LastPingAt     time.Time    `gorm:"column:last_ping_at;default:now()"`
	DisconnectedAt *time.Time   `gorm:"column:disconnected_at"`
}

// PendingStatus is a row of mesh.pending_status: a hook status report that
// arrived before its session's presence existed, keyed by (pid, cwd). The
// table has no foreign keys on purpose, and status/status_source are plain
// text columns in the reference, not the enums.
type PendingStatus struct {
	ID           string               `gorm:"column:id;primaryKey"`
	PID          int32                `gorm:"column:pid"`
	Cwd          string               `gorm:"column:cwd"`
	Status       PresenceStatus       `gorm:"column:status"`
	StatusSource PresenceStatusSource `gorm:"column:status_source"`
	CreatedAt    time.Time            `gorm:"column:created_at;default:now();autoCreateTime:false"`
	AppliedAt    *time.Time           `gorm:"column:applied_at"`
}

// PeerState is a row of mesh.peer_state: what a member's last session left
// behind, restored on its next hello. One row per (mesh_id, member_id).
type PeerState struct {
	ID       string `gorm:"column:id;primaryKey"`
	MeshID   string `gorm:"column:mesh_id"`
	MemberID string `gorm:"column:member_id"`
	// Groups is a JSON array of {name, role?}; nullable, default [].
	Groups JSON `gorm:"column:groups;default:'[]'"`
	// Profile is a JSON object (avatar, title, bio, capabilities); nullable,
	// default {}.
	Profile JSON `gorm:"column:profile;default:'{}'"`
	// Visible is NOT NULL DEFAULT true in the database, but has no gorm
	// default: gorm would turn an explicit false into true. Always set it.
	Visible         bool    `gorm:"column:visible"`
	LastSummary     *string `gorm:"column:last_summary"`
	LastDisplayName *string `gorm:"column:last_display_name"`
	// CumulativeStats is {messagesIn, messagesOut, toolCalls, errors};
	// nullable, defaults to all zero.
	CumulativeStats JSON       `gorm:"column:cumulative_stats;default:'{\"messagesIn\":0,\"messagesOut\":0,\"toolCalls\":0,\"errors\":0}'"`
	LastSeenAt      *time.Time `gorm:"column:last_seen_at"`
	CreatedAt       time.Time  `gorm:"column:created_at;default:now();autoCreateTime:false"`
	UpdatedAt       time.Time  `gorm:"column:updated_at;default:now();autoUpdateTime:false"`
}
