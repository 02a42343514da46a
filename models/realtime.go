package models

import "time"

// State is a row of mesh.state: one shared key/value per (mesh_id, key).
type State struct {
	ID     string `gorm:"column:id;primaryKey"`
	MeshID string `gorm:"column:mesh_id"`
	Key    string `gorm:"column:key"`
	// Value is NOT NULL without a default: a nil Value fails the insert, as a
	// JSON null bound as SQL NULL does in the reference.
	Value             JSON      `gorm:"column:value"`
	UpdatedByPresence *string   `gorm:"column:updated_by_presence"`
	UpdatedByName     *string   `gorm:"column:updated_by_name"`
	UpdatedAt         time.Time `gorm:"column:updated_at;default:now();autoUpdateTime:false"`
}

// Stream is a row of mesh.stream, the catalogue of named live streams; unique
// on (mesh_id, name).
type Stream struct {
	ID            string    `gorm:"column:id;primaryKey"`
	MeshID        string    `gorm:"column:mesh_id"`
	Name          string    `gorm:"column:name"`
	CreatedByName *string   `gorm:"column:created_by_name"`
	CreatedAt     time.Time `gorm:"column:created_at;default:now();autoCreateTime:false"`
}

// Service is a row of mesh.service, a runner-managed MCP service. The table
// is in mesh.ts but no reference migration creates it, so a database built by
// the migrations alone lacks it until Bootstrap creates it.
type Service struct {
	ID         string `gorm:"column:id;primaryKey"`
	MeshID     string `gorm:"column:mesh_id"`
	Name       string `gorm:"column:name"`
	Type       string `gorm:"column:type"`
	SourceType string `gorm:"column:source_type"`
	// SourceFileID references mesh.file(id).
	SourceFileID    *string `gorm:"column:source_file_id"`
	SourceGitURL    *string `gorm:"column:source_git_url"`
	SourceGitBranch *string `gorm:"column:source_git_branch;default:main"`
	SourceGitSha    *string `gorm:"column:source_git_sha"`
	PrevGitSha      *string `gorm:"column:prev_git_sha"`
	Description     string  `gorm:"column:description"`
	Instructions    *string `gorm:"column:instructions"`
	ToolsSchema     JSON    `gorm:"column:tools_schema"`
	Manifest        JSON    `gorm:"column:manifest"`
	Runtime         *string `gorm:"column:runtime"`
	// Status is free text ("running", "stopped", ...); nullable, default stopped.
	Status       *string    `gorm:"column:status;default:stopped"`
	Config       JSON       `gorm:"column:config;default:'{}'"`
	LastHealth   *time.Time `gorm:"column:last_health"`
	RestartCount *int32     `gorm:"column:restart_count;default:0"`
	Version      *int32     `gorm:"column:version;default:1"`
	// Scope is a string or an object ({"type":"peer"|"mesh", peers, group,
	// groups, role}); nullable, default {"type":"peer"}.
	Scope JSON `gorm:"column:scope;default:'{\"type\":\"peer\"}'"`
	// DeployedBy references mesh.member(id).
	DeployedBy     *string   `gorm:"column:deployed_by"`
	DeployedByName *string   `gorm:"column:deployed_by_name"`
	CreatedAt      time.Time `gorm:"column:created_at;default:now();autoCreateTime:false"`
	UpdatedAt      time.Time `gorm:"column:updated_at;default:now();autoUpdateTime:false"`
}
