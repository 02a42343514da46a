package models

import "time"

// Mesh is a row of mesh.mesh: a group of peers that talk through the broker.
type Mesh struct {
	ID   string `gorm:"column:id;primaryKey"`
	Name string `gorm:"column:name"`
	// Slug is cosmetic: migration 0017 dropped its unique constraint (mesh.ts
	// still says unique), so two meshes may share one.
	Slug string `gorm:"column:slug"`
	// OwnerUserID references public."user"(id), the web app's auth table.
	// The reference migrations create that foreign key; Bootstrap does not,
	// since the user table is not ours.
	OwnerUserID string     `gorm:"column:owner_user_id"`
	Visibility  Visibility `gorm:"column:visibility;default:private"`
	Transport   Transport  `gorm:"column:transport;default:managed"`
	MaxPeers    *int32     `gorm:"column:max_peers"`
	Tier        Tier       `gorm:"column:tier;default:free"`
	CreatedAt   time.Time  `gorm:"column:created_at;default:now();autoCreateTime:false"`
	ArchivedAt  *time.Time `gorm:"column:archived_at"`
	// OwnerPubkey is the hex ed25519 key that signs invites.
	OwnerPubkey    *string `gorm:"column:owner_pubkey"`
	OwnerSecretKey *string `gorm:"column:owner_secret_key"`
	RootKey        *string `gorm:"column:root_key"`
	// SelfEditable is the per-mesh policy of which profile fields members may
	// edit themselves: {"displayName","roleTag","groups","messageMode"} → bool.
	// Nullable; defaults to all true.
	SelfEditable JSON `gorm:"column:self_editable;default:'{\"displayName\":true,\"roleTag\":true,\"groups\":true,\"messageMode\":true}'"`
}

// Member is a row of mesh.member: a peer identity (ed25519 key) in one mesh.
type Member struct {
	ID     string `gorm:"column:id;primaryKey"`
	MeshID string `gorm:"column:mesh_id"`
	// UserID references public."user"(id) ON DELETE SET NULL in the reference;
	// null for peers that joined by invite without an account.
	UserID      *string    `gorm:"column:user_id"`
	PeerPubkey  string     `gorm:"column:peer_pubkey"`
	DisplayName string     `gorm:"column:display_name"`
	Role        Role       `gorm:"column:role;default:member"`
	JoinedAt    time.Time  `gorm:"column:joined_at;default:now()"`
	LastSeenAt  *time.Time `gorm:"column:last_seen_at"`
	RevokedAt   *time.Time `gorm:"column:revoked_at"`
	// RoleTag is a free-text label peers see, unrelated to Role.
	RoleTag *string `gorm:"column:role_tag"`
	// DefaultGroups is a JSON array of {name, role?}; nullable, default [].
	DefaultGroups JSON `gorm:"column:default_groups;default:'[]'"`
	// MessageMode is one of the MessageMode* values; nullable, default push.
	MessageMode     *string `gorm:"column:message_mode;default:push"`
	DashboardUserID *string `gorm:"column:dashboard_user_id"`
	// PeerGrants maps a sender's pubkey to the capabilities it may use
	// towards this member (`{"<hex>":["dm","broadcast",...]}`). NOT NULL,
	// default {} meaning "use the defaults"; an empty array blocks that peer.
	PeerGrants JSON `gorm:"column:peer_grants;default:'{}'"`
}
