package services

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/claudemesh/meshbroker/models"
)

// MemberDirectory reads mesh and member rows. The web app and the
// provisioning commands own these tables; the broker only reads them, except
// for ban/unban (revoked_at). Grants are cached per mesh for a short TTL so
// a send does not cost a member query; a revocation or grant change takes
// effect within that TTL, and immediately for ban/unban done here.
//
// Concurrency: each cache guards itself and keys is guarded by mu; queries
// run outside both.
type MemberDirectory struct {
	db  *models.DB
	now func() time.Time

	grants *loadCache[map[string]map[string][]string] // meshID -> member pubkey -> (granted pubkey -> capabilities)
	byKey  *loadCache[memberEntry]                    // mesh|pubkey -> lookup result, for hellos
	meshes *loadCache[*MeshRow]                       // mesh id -> row, for hellos
	svcs   *loadCache[[]ServiceRow]                   // mesh id -> running services, for hellos

	mu   sync.Mutex
	keys map[string]string // member id -> peer_pubkey; a member's key never changes once bound (BindClaimedMember drops its entry)
}

type memberEntry struct {
	active, revoked *MemberRow
}

// ServiceRow is the part of mesh.service a hello_ack lists.
type ServiceRow struct {
	Name           string
	Description    *string
	Status         *string
	ToolsSchema    models.JSON
	DeployedBy     *string
	DeployedByName *string
	Scope          models.JSON
}

// MemberRow is the part of mesh.member the broker uses.
type MemberRow struct {
	ID            string
	MeshID        string
	UserID        *string
	PeerPubkey    string
	DisplayName   string
	Role          string
	RoleTag       *string
	DefaultGroups models.JSON
	MessageMode   *string
	RevokedAt     *time.Time
	PeerGrants    models.JSON
}

// MeshRow is the part of mesh.mesh the broker uses.
type MeshRow struct {
	ID           string
	Name         string
	Slug         string
	OwnerUserID  *string
	SelfEditable models.JSON
}

// Label is how a revocation message names the mesh: name, else slug, else id.
func (m *MeshRow) Label() string {
	switch {
	case m.Name != "":
		return m.Name
	case m.Slug != "":
		return m.Slug
	}
	return m.ID
}

// NewMemberDirectory makes a directory whose caches (grants, member and mesh
// lookups, services) keep an entry cacheTTL.
func NewMemberDirectory(db *models.DB, now func() time.Time, cacheTTL time.Duration) *MemberDirectory {
	return &MemberDirectory{db: db, now: now, keys: map[string]string{},
		grants: newLoadCache[map[string]map[string][]string](cacheTTL, 10_000), byKey: newLoadCache[memberEntry](cacheTTL, 100_000),
		meshes: newLoadCache[*MeshRow](cacheTTL, 10_000), svcs: newLoadCache[[]ServiceRow](cacheTTL, 10_000)}
}

const memberColumns = "id, mesh_id, user_id, peer_pubkey, display_name, role, role_tag, default_groups, message_mode, revoked_at, peer_grants"

// ByPubkey finds the member of meshID with peer_pubkey (exact, case
// sensitive). active is the first non-revoked row; if there is none,
// revoked is the first revoked one. Both nil: not a member.
//
// Results are cached for cacheTTL, so a reconnect storm costs no member
// queries; a revocation made elsewhere takes effect within that TTL, one
// made by this broker (ban) at once.
func (d *MemberDirectory) ByPubkey(ctx context.Context, meshID, pubkey string) (active, revoked *MemberRow, err error) {
	e, err := d.byKey.load(ctx, meshID+"|"+pubkey, d.now(), func(ctx context.Context) (memberEntry, error) {
		active, revoked, err := d.lookupByPubkey(ctx, meshID, pubkey)
		return memberEntry{active: active, revoked: revoked}, err
	})
	if err != nil {
		return nil, nil, err
	}
	return e.active, e.revoked, nil
}

// Remember caches an active member row read at loaded by a query of its
// own (the lease restore joins the member rows), as ByPubkey would have.
func (d *MemberDirectory) Remember(m *MemberRow, loaded time.Time) {
	d.byKey.put(m.MeshID+"|"+m.PeerPubkey, memberEntry{active: m}, loaded)
}

func (d *MemberDirectory) lookupByPubkey(ctx context.Context, meshID, pubkey string) (active, revoked *MemberRow, err error) {
	var rows []MemberRow
	err = d.db.WithContext(ctx).Raw("SELECT "+memberColumns+" FROM "+d.db.Table("member")+
		" WHERE mesh_id = ? AND peer_pubkey = ? ORDER BY revoked_at IS NOT NULL LIMIT 2", meshID, pubkey).Scan(&rows).Error
	if err != nil {
		return nil, nil, fmt.Errorf("look up member %s: %w", shortKey(pubkey), err)
	}
	// Copies, not pointers into rows: the cache keeps what is returned, and
	// gorm's scan slice is far larger than one row.
	for _, r := range rows {
		if r.RevokedAt == nil {
			return &r, nil, nil
		}
	}
	if len(rows) > 0 {
		r := rows[0]
		return nil, &r, nil
	}
	return nil, nil, nil
}

// ByID returns a member row by id, or nil.
func (d *MemberDirectory) ByID(ctx context.Context, id string) (*MemberRow, error) {
	var rows []MemberRow
	err := d.db.WithContext(ctx).Raw("SELECT "+memberColumns+" FROM "+d.db.Table("member")+" WHERE id = ? LIMIT 1", id).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("look up member %s: %w", id, err)
	}
	if len(rows) == 0 {
		return nil, nil
	}
	r := rows[0] // a copy: callers and caches keep it, not gorm's scan slice
	return &r, nil
}

// Pubkey returns a member's peer_pubkey (cached: drains resolve the sender
// of every row without a session key), or "" for an unknown member.
func (d *MemberDirectory) Pubkey(ctx context.Context, memberID string) (string, error) {
	d.mu.Lock()
	k, ok := d.keys[memberID]
	d.mu.Unlock()
	if ok {
		return k, nil
	}
	m, err := d.ByID(ctx, memberID)
	if err != nil || m == nil {
		return "", err
	}
	d.mu.Lock()
	if len(d.keys) > 100_000 { // bound the cache; refilling is one query per member
		clear(d.keys)
	}
	d.keys[memberID] = m.PeerPubkey
	d.mu.Unlock()
	return m.PeerPubkey, nil
}

// Mesh returns the mesh row, or nil.
// The row is cached for cacheTTL.
func (d *MemberDirectory) Mesh(ctx context.Context, meshID string) (*MeshRow, error) {
	return d.meshes.load(ctx, meshID, d.now(), func(ctx context.Context) (*MeshRow, error) { return d.lookupMesh(ctx, meshID) })
}

func (d *MemberDirectory) lookupMesh(ctx context.Context, meshID string) (*MeshRow, error) {
	var rows []MeshRow
	err := d.db.WithContext(ctx).Raw("SELECT id, name, slug, owner_user_id, self_editable FROM "+d.db.Table("mesh")+" WHERE id = ? LIMIT 1", meshID).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("look up mesh %s: %w", meshID, err)
	}
	if len(rows) == 0 {
		return nil, nil
	}
	r := rows[0] // a copy: callers and caches keep it, not gorm's scan slice
	return &r, nil
}

// RunningServices returns the mesh's services with status 'running', from a
// cache at most cacheTTL old: every member hello lists them, and a reconnect
// storm should not cost a query per socket. The rows are shared; callers
// must not modify them.
func (d *MemberDirectory) RunningServices(ctx context.Context, meshID string) ([]ServiceRow, error) {
	return d.svcs.load(ctx, meshID, d.now(), func(ctx context.Context) ([]ServiceRow, error) {
		var rows []ServiceRow
		err := d.db.WithContext(ctx).Raw("SELECT name, description, status, tools_schema, deployed_by, deployed_by_name, scope FROM "+d.db.Table("service")+
			" WHERE mesh_id = ? AND status = 'running'", meshID).Scan(&rows).Error
		if err != nil {
			return nil, fmt.Errorf("list services of mesh %s: %w", meshID, err)
		}
		return rows, nil
	})
}

// IsModerator reports whether memberID may disconnect, kick, ban or unban in
// meshID: the mesh owner (mesh.owner_user_id = member.user_id) or an admin.
func (d *MemberDirectory) IsModerator(ctx context.Context, meshID, memberID string) (bool, error) {
	mesh, err := d.Mesh(ctx, meshID)
	if err != nil || mesh == nil {
		return false, err
	}
	m, err := d.ByID(ctx, memberID)
	if err != nil || m == nil {
		return false, err
	}
	if m.Role == "admin" {
		return true, nil
	}
	return mesh.OwnerUserID != nil && m.UserID != nil && *mesh.OwnerUserID == *m.UserID, nil
}

// Grants returns peer_grants of every member of the mesh, keyed by the
// member's pubkey, from a cache at most cacheTTL old.
func (d *MemberDirectory) Grants(ctx context.Context, meshID string) (map[string]map[string][]string, error) {
	return d.grants.load(ctx, meshID, d.now(), func(ctx context.Context) (map[string]map[string][]string, error) { return d.loadGrants(ctx, meshID) })
}

func (d *MemberDirectory) loadGrants(ctx context.Context, meshID string) (map[string]map[string][]string, error) {
	var rows []struct {
		PeerPubkey string
		PeerGrants models.JSON
	}
	err := d.db.WithContext(ctx).Raw("SELECT peer_pubkey, peer_grants FROM "+d.db.Table("member")+" WHERE mesh_id = ? AND revoked_at IS NULL", meshID).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("load grants of mesh %s: %w", meshID, err)
	}
	byKey := make(map[string]map[string][]string, len(rows))
	for _, r := range rows {
		var g map[string][]string
		if len(r.PeerGrants) > 0 && json.Unmarshal(r.PeerGrants, &g) == nil && len(g) > 0 {
			byKey[r.PeerPubkey] = g
		}
	}
	return byKey, nil
}

// Invalidate drops everything cached about a mesh's members (after
// ban/unban), so the change applies to the next hello and send.
func (d *MemberDirectory) Invalidate(meshID string) {
	d.grants.drop(meshID)
	prefix := meshID + "|"
	d.byKey.dropIf(func(k string) bool { return strings.HasPrefix(k, prefix) })
}

// Allows applies the fan-out grant test (02 §2.5): the recipient member's
// grants map decides by the sender's member key, else by the sender's
// session key, else the default (dm and broadcast allowed).
func Allows(recipientGrants map[string][]string, senderMemberKey, senderSessionKey, capability string) bool {
	caps, ok := recipientGrants[senderMemberKey]
	if !ok && senderSessionKey != "" {
		caps, ok = recipientGrants[senderSessionKey]
	}
	if !ok {
		return capability == "dm" || capability == "broadcast" || capability == "read" || capability == "state-read"
	}
	for _, c := range caps {
		if c == capability {
			return true
		}
	}
	return false
}

func shortKey(k string) string {
	if len(k) > 8 {
		return k[:8]
	}
	return k
}
