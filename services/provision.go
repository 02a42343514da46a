package services

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// ProvisionService creates meshes and enrolls members, so a broker without
// the web app is usable (`meshbroker mesh create`, `member add`, `demo`).
// Each method is one transaction; invalid input changes nothing.
type ProvisionService struct {
	db  *models.DB
	now func() time.Time
}

// NewProvisionService makes the provisioning service.
func NewProvisionService(db *models.DB, now func() time.Time) *ProvisionService {
	return &ProvisionService{db: db, now: now}
}

// Identity is everything a client needs to connect as a member. SecretKey
// is the 64-byte ed25519 secret (seed || public key) in hex, as libsodium
// stores it.
type Identity struct {
	MeshID      string `json:"meshId"`
	MemberID    string `json:"memberId"`
	DisplayName string `json:"displayName"`
	Pubkey      string `json:"pubkey"`
	SecretKey   string `json:"secretKey,omitempty"`
	Role        string `json:"role"`
	// Slug and RootKey are set by mesh create: what a claudemesh CLI config
	// entry for the mesh holds besides the member's identity.
	Slug    string `json:"slug,omitempty"`
	RootKey string `json:"rootKey,omitempty"`
}

// PrivateKey decodes SecretKey.
func (i Identity) PrivateKey() (ed25519.PrivateKey, error) {
	b, err := hex.DecodeString(i.SecretKey)
	if err != nil || len(b) != ed25519.PrivateKeySize {
		return nil, errors.New("secretKey must be 128 hex characters")
	}
	return ed25519.PrivateKey(b), nil
}

// NewIdentityKey makes a fresh ed25519 key pair.
func NewIdentityKey() (ed25519.PrivateKey, error) {
	_, key, err := ed25519.GenerateKey(nil)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return key, nil
}

// CreateMesh creates a mesh with its `general` topic and an owner member
// (role admin) holding a new key pair, returned with its secret.
// ownerUserID is mesh.owner_user_id; on a database the web app shares it
// must name an existing user, elsewhere any id will do.
func (p *ProvisionService) CreateMesh(ctx context.Context, name, ownerUserID, ownerName string) (Identity, error) {
	name = strings.TrimSpace(name)
	if name == "" {
		return Identity{}, newError(protocol.CodeInvalidArgument, "mesh name must not be empty")
	}
	if ownerUserID == "" {
		ownerUserID = "meshbroker-" + models.NewID()[:16]
	}
	if ownerName == "" {
		ownerName = "owner"
	}
	key, err := NewIdentityKey()
	if err != nil {
		return Identity{}, err
	}
	id := Identity{MeshID: models.NewID(), MemberID: models.NewID(), DisplayName: ownerName, Pubkey: protocol.PubkeyHex(key), SecretKey: hex.EncodeToString(key), Role: "admin"}
	// The invite signing key is its own key pair, as in the reference, so
	// the secret the mesh row must hold to sign invites is not the owner
	// member's identity.
	signPub, signSecret, rootKey, err := NewMeshKeys()
	if err != nil {
		return Identity{}, err
	}
	id.Slug, id.RootKey = slugify(name), rootKey
	now := p.now().UTC()
	err = p.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec("INSERT INTO "+p.db.Table("mesh")+" (id, name, slug, owner_user_id, owner_pubkey, owner_secret_key, root_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
			id.MeshID, name, id.Slug, ownerUserID, signPub, signSecret, rootKey, now).Error; err != nil {
			return fmt.Errorf("insert mesh: %w", err)
		}
		if err := p.insertMember(tx, id.MeshID, id.MemberID, id.Pubkey, ownerName, "admin", &ownerUserID, now); err != nil {
			return err
		}
		topicID := models.NewID()
		if err := tx.Exec("INSERT INTO "+p.db.Table("topic")+" (id, mesh_id, name, description, visibility, created_by_member_id, created_at) VALUES (?, ?, 'general', ?, 'public', ?, ?)",
			topicID, id.MeshID, generalTopicDescription, id.MemberID, now).Error; err != nil {
			return fmt.Errorf("insert general topic: %w", err)
		}
		if err := tx.Exec("INSERT INTO "+p.db.Table("topic_member")+" (topic_id, member_id, role, joined_at) VALUES (?, ?, 'lead', ?)", topicID, id.MemberID, now).Error; err != nil {
			return fmt.Errorf("subscribe owner to general: %w", err)
		}
		return nil
	})
	if err != nil {
		return Identity{}, fmt.Errorf("create mesh %q: %w", name, err)
	}
	return id, nil
}

func (p *ProvisionService) insertMember(tx *gorm.DB, meshID, memberID, pubkey, name, role string, userID *string, now time.Time) error {
	if err := tx.Exec("INSERT INTO "+p.db.Table("member")+" (id, mesh_id, user_id, peer_pubkey, display_name, role, joined_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
		memberID, meshID, userID, pubkey, name, role, now).Error; err != nil {
		return fmt.Errorf("insert member: %w", err)
	}
	return nil
}

// AddMember enrolls an existing public key in a mesh. The key may be given
// in either case; it is stored in lower case, as hellos carry it. A key
// whose member was revoked is enrolled again as a new member row: the
// revoked row keeps its history (audit entries, queued rows name it), and
// hello lookups prefer the active row. The shared schema has no unique
// constraint on (mesh_id, peer_pubkey), so both rows can exist.
func (p *ProvisionService) AddMember(ctx context.Context, meshID, pubkey, name, role string) (Identity, error) {
	pubkey = strings.ToLower(strings.TrimSpace(pubkey))
	switch {
	case !protocol.IsLowerHex(pubkey, 64):
		return Identity{}, newError(protocol.CodeInvalidArgument, "pubkey must be 64 hex characters (32 bytes)")
	case strings.TrimSpace(name) == "":
		return Identity{}, newError(protocol.CodeInvalidArgument, "name must not be empty")
	case role != "admin" && role != "member":
		return Identity{}, newError(protocol.CodeInvalidArgument, "role must be admin or member")
	}
	id := Identity{MeshID: meshID, MemberID: models.NewID(), DisplayName: name, Pubkey: pubkey, Role: role}
	err := p.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		var n int64
		if err := tx.Raw("SELECT count(*) FROM "+p.db.Table("mesh")+" WHERE id = ?", meshID).Scan(&n).Error; err != nil {
			return err
		}
		if n == 0 {
			return newError(protocol.CodeNotFound, "no mesh "+meshID)
		}
		if err := tx.Raw("SELECT count(*) FROM "+p.db.Table("member")+" WHERE mesh_id = ? AND peer_pubkey = ? AND revoked_at IS NULL", meshID, pubkey).Scan(&n).Error; err != nil {
			return err
		}
		if n > 0 {
			return newError(protocol.CodeInvalid, "pubkey is already a member of this mesh")
		}
		return p.insertMember(tx, meshID, id.MemberID, pubkey, name, role, nil, p.now().UTC())
	})
	if err != nil {
		return Identity{}, err
	}
	return id, nil
}

// RevokeMember sets revoked_at on the member with that id or pubkey.
func (p *ProvisionService) RevokeMember(ctx context.Context, meshID, ref string) (string, error) {
	if protocol.IsLowerHex(strings.ToLower(ref), 64) {
		ref = strings.ToLower(ref) // a pubkey; member ids are not 64 hex
	}
	res := p.db.WithContext(ctx).Exec("UPDATE "+p.db.Table("member")+" SET revoked_at = ? WHERE mesh_id = ? AND (id = ? OR peer_pubkey = ?) AND revoked_at IS NULL",
		p.now().UTC(), meshID, ref, ref)
	if res.Error != nil {
		return "", fmt.Errorf("revoke member: %w", res.Error)
	}
	if res.RowsAffected == 0 {
		return "", newError(protocol.CodeNotFound, "no active member "+ref+" in mesh "+meshID)
	}
	return ref, nil
}

// Demo creates a mesh with an owner and a second member, both with keys.
func (p *ProvisionService) Demo(ctx context.Context, name string) ([]Identity, error) {
	owner, err := p.CreateMesh(ctx, name, "", "alice")
	if err != nil {
		return nil, err
	}
	key, err := NewIdentityKey()
	if err != nil {
		return nil, err
	}
	bob, err := p.AddMember(ctx, owner.MeshID, protocol.PubkeyHex(key), "bob", "member")
	if err != nil {
		return nil, err
	}
	bob.SecretKey = hex.EncodeToString(key)
	return []Identity{owner, bob}, nil
}

func slugify(name string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(name) {
		switch {
		case r >= 'a' && r <= 'z' || r >= '0' && r <= '9':
			b.WriteRune(r)
		case b.Len() > 0 && !strings.HasSuffix(b.String(), "-"):
			b.WriteByte('-')
		}
	}
	s := strings.TrimSuffix(b.String(), "-")
	if s == "" {
		s = "mesh"
	}
	return s
}

// KeyPair is what `meshbroker keygen` prints: the public key for
// `member add` and the 64-byte libsodium-style secret for an identity file.
type KeyPair struct {
	Pubkey    string `json:"pubkey"`
	SecretKey string `json:"secretKey"`
}

// NewKeyPair renders key as hex.
func NewKeyPair(key ed25519.PrivateKey) KeyPair {
	return KeyPair{Pubkey: protocol.PubkeyHex(key), SecretKey: hex.EncodeToString(key)}
}

// MeshSummary is one line of `mesh list`.
type MeshSummary struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Slug      string    `json:"slug"`
	CreatedAt time.Time `json:"createdAt"`
	Members   int       `json:"members"` // active (not revoked)
}

// ListMeshes lists every mesh that is not archived, oldest first.
func (p *ProvisionService) ListMeshes(ctx context.Context) ([]MeshSummary, error) {
	out := []MeshSummary{}
	err := p.db.WithContext(ctx).Raw("SELECT m.id, m.name, m.slug, m.created_at, " +
		"(SELECT count(*) FROM " + p.db.Table("member") + " x WHERE x.mesh_id = m.id AND x.revoked_at IS NULL) AS members " +
		"FROM " + p.db.Table("mesh") + " m WHERE m.archived_at IS NULL ORDER BY m.created_at, m.id").Scan(&out).Error
	if err != nil {
		return nil, fmt.Errorf("list meshes: %w", err)
	}
	return out, nil
}

// MemberSummary is one line of `member list`.
type MemberSummary struct {
	ID          string     `json:"id"`
	DisplayName string     `json:"displayName"`
	Pubkey      string     `json:"pubkey" gorm:"column:peer_pubkey"`
	Role        string     `json:"role"`
	JoinedAt    time.Time  `json:"joinedAt"`
	RevokedAt   *time.Time `json:"revokedAt,omitempty"`
}

// ListMembers lists a mesh's members, revoked ones included, oldest first.
func (p *ProvisionService) ListMembers(ctx context.Context, meshID string) ([]MemberSummary, error) {
	var n int64
	if err := p.db.WithContext(ctx).Raw("SELECT count(*) FROM "+p.db.Table("mesh")+" WHERE id = ?", meshID).Scan(&n).Error; err != nil {
		return nil, fmt.Errorf("list members: %w", err)
	}
	if n == 0 {
		return nil, newError(protocol.CodeNotFound, "no mesh "+meshID)
	}
	out := []MemberSummary{}
	err := p.db.WithContext(ctx).Raw("SELECT id, display_name, peer_pubkey, role, joined_at, revoked_at FROM "+p.db.Table("member")+
		" WHERE mesh_id = ? ORDER BY joined_at, id", meshID).Scan(&out).Error
	if err != nil {
		return nil, fmt.Errorf("list members of %s: %w", meshID, err)
	}
	return out, nil
}
