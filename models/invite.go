package models

import "time"

// Invite is a row of mesh.invite: one signed permission to join a mesh,
// usable max_uses times, through either protocol. Token is the v1 link's
// payload (base64url of the signed JSON); Code is the v2 short code, whose
// signed capability is CapabilityV2. Both protocols spend the same
// used_count.
type Invite struct {
	ID     string `gorm:"column:id;primaryKey"`
	MeshID string `gorm:"column:mesh_id"`
	Token  string `gorm:"column:token"`
	// TokenBytes is the v1 canonical string the owner key signed.
	TokenBytes *string `gorm:"column:token_bytes"`
	Code       *string `gorm:"column:code"`
	MaxUses    int     `gorm:"column:max_uses;default:1"`
	UsedCount  int     `gorm:"column:used_count;default:0"`
	Role       Role    `gorm:"column:role;default:member"`
	// Preset is {displayName?, roleTag?, groups?, messageMode?}, applied to
	// the member an invite creates.
	Preset    JSON      `gorm:"column:preset;default:'{}'"`
	ExpiresAt time.Time `gorm:"column:expires_at"`
	// CreatedBy references public."user"(id) in the reference (not created
	// here, as for mesh.owner_user_id); meshbroker writes the mesh's owner.
	CreatedBy string     `gorm:"column:created_by"`
	CreatedAt time.Time  `gorm:"column:created_at;default:now()"`
	RevokedAt *time.Time `gorm:"column:revoked_at"`
	Version   int        `gorm:"column:version;default:1"`
	// CapabilityV2 is JSON {"canonical": "v=2|...", "signature": hex}.
	CapabilityV2 *string `gorm:"column:capability_v2"`
	// ClaimedByPubkey is the last claimant's key (v2: its x25519 key, as
	// the reference writes it). Audit only.
	ClaimedByPubkey *string `gorm:"column:claimed_by_pubkey"`
}

// mesh.invite as migrations 0000, 0001, 0015, 0018 and 0019 leave it. Not
// created: invite_created_by_user_id_fk → public."user".
const pgInvite = `CREATE TABLE IF NOT EXISTS mesh.invite (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	token text NOT NULL,
	max_uses integer DEFAULT 1 NOT NULL,
	used_count integer DEFAULT 0 NOT NULL,
	role mesh.role DEFAULT 'member' NOT NULL,
	expires_at timestamp NOT NULL,
	created_by text NOT NULL,
	created_at timestamp DEFAULT now() NOT NULL,
	revoked_at timestamp,
	token_bytes text,
	preset jsonb DEFAULT '{}'::jsonb,
	code text,
	version integer DEFAULT 1 NOT NULL,
	capability_v2 text,
	claimed_by_pubkey text,
	CONSTRAINT invite_token_unique UNIQUE (token),
	CONSTRAINT invite_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE
)`

var pgInviteIndexes = []string{
	`CREATE UNIQUE INDEX IF NOT EXISTS invite_code_unique_idx ON mesh.invite (code) WHERE code IS NOT NULL`,
}

const sqliteInvite = `CREATE TABLE IF NOT EXISTS invite (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	token TEXT NOT NULL UNIQUE,
	max_uses INTEGER NOT NULL DEFAULT 1,
	used_count INTEGER NOT NULL DEFAULT 0,
	role TEXT NOT NULL DEFAULT 'member' CHECK (role IN {enum:role}),
	expires_at DATETIME NOT NULL,
	created_by TEXT NOT NULL,
	created_at DATETIME NOT NULL DEFAULT {now},
	revoked_at DATETIME,
	token_bytes TEXT,
	preset TEXT DEFAULT '{}' CHECK (preset IS NULL OR json_valid(preset)),
	code TEXT,
	version INTEGER NOT NULL DEFAULT 1,
	capability_v2 TEXT,
	claimed_by_pubkey TEXT
)`

var sqliteInviteIndexes = []string{
	`CREATE UNIQUE INDEX IF NOT EXISTS invite_code_unique_idx ON invite (code) WHERE code IS NOT NULL`,
}
