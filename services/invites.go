package services

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/nacl/box"
	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// InviteService issues, lists, revokes and redeems mesh invites: v1 links
// (ic://join/<signed payload>, redeemed by POST /join with the claimant's
// ed25519 key) and v2 short codes (POST /invites/:code/claim, which seals
// the mesh root key to a throwaway x25519 key of the claimant). One
// mesh.invite row carries both, and both spend its one used_count.
//
// Concurrency: a redemption is one database transaction that
//  1. locks its mesh row (SELECT ... FOR NO KEY UPDATE on Postgres, which
//     does not block the KEY SHARE locks of ordinary inserts referencing the
//     mesh; SQLite runs each write transaction alone, BEGIN IMMEDIATE on its
//     one connection). Joins of one mesh therefore never interleave their
//     "is this key already a member" check with the member insert: the
//     shared schema has no unique index on (mesh_id, peer_pubkey) to do it;
//  2. spends a use with one conditional UPDATE ... SET used_count =
//     used_count + 1 WHERE used_count < max_uses AND revoked_at IS NULL AND
//     expires_at > now. Of two claims racing for the last use exactly one
//     sees a row affected, also against another broker process or the web
//     app writing the same row (on Postgres the second UPDATE waits for the
//     first's row lock and re-evaluates its WHERE on the committed row);
//  3. inserts the member and its #general subscription.
//
// Any refusal or failure rolls all three back, so a refused redemption
// creates nothing. Revocation is one UPDATE: a redemption either committed
// before it or sees revoked_at. The service keeps no state of its own.
type InviteService struct {
	db      *models.DB
	now     func() time.Time
	members *MemberDirectory // nil in the provisioning commands; caches to drop after a join
}

// NewInviteService makes the invite service. members may be nil.
func NewInviteService(db *models.DB, now func() time.Time, members *MemberDirectory) *InviteService {
	return &InviteService{db: db, now: now, members: members}
}

// RouteError is a refused HTTP request (an invite redemption, a member
// route): the status and the error string the CLI prints. The statuses
// are part of the CLI contract (its v2 client words 400, 404 and 410
// differently), so the service, which knows why it refused, chooses them.
type RouteError struct {
	Status int
	Code   string
}

func (e *RouteError) Error() string { return fmt.Sprintf("refused (%d): %s", e.Status, e.Code) }

func refuse(status int, code string) *RouteError { return &RouteError{Status: status, Code: code} }

// AsRouteError returns the *RouteError inside err, if any.
func AsRouteError(err error) (*RouteError, bool) {
	var e *RouteError
	ok := errors.As(err, &e)
	return e, ok
}

// Limits on what a redemption accepts; anything longer is refused before
// any query.
const (
	maxInviteToken   = 8192
	maxDisplayName   = 128
	inviteCodeLength = 12 // base62, ~71 bits; the CLI accepts 6-16
	defaultInviteTTL = 7 * 24 * time.Hour
	maxInviteTTL     = 366 * 24 * time.Hour
	maxInviteUses    = 100_000
)

var (
	inviteCodeRE  = regexp.MustCompile(`^[A-Za-z0-9]{1,64}$`)
	inviteTokenRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
)

// InviteOptions are what `meshbroker invite create` accepts.
type InviteOptions struct {
	Role      string        // admin or member; "" is member
	MaxUses   int           // at least 1
	TTL       time.Duration // 0 is 7 days
	BrokerURL string        // ws:// or wss:// URL written into the v1 link
}

// IssuedInvite is a created invite, as `invite create` prints it.
type IssuedInvite struct {
	ID        string `json:"id"`
	Link      string `json:"link"`
	Code      string `json:"code"`
	ExpiresAt string `json:"expiresAt"`
	Role      string `json:"role"`
	MaxUses   int    `json:"maxUses"`
}

// InviteInfo is one row of `invite list`.
type InviteInfo struct {
	ID        string  `json:"id"`
	Code      *string `json:"code"`
	Role      string  `json:"role"`
	MaxUses   int     `json:"maxUses"`
	UsedCount int     `json:"usedCount"`
	Version   int     `json:"version"`
	ExpiresAt string  `json:"expiresAt"`
	CreatedAt string  `json:"createdAt"`
	RevokedAt *string `json:"revokedAt"`
}

type meshKeyRow struct {
	ID             string
	Slug           string
	OwnerUserID    string
	OwnerPubkey    *string
	OwnerSecretKey *string
	RootKey        *string
	ArchivedAt     *time.Time
}

func (s *InviteService) loadMesh(tx *gorm.DB, meshID string, lock bool) (*meshKeyRow, error) {
	q := "SELECT id, slug, owner_user_id, owner_pubkey, owner_secret_key, root_key, archived_at FROM " + s.db.Table("mesh") + " WHERE id = ?"
	if lock && s.db.IsPostgres() {
		q += " FOR NO KEY UPDATE"
	}
	var rows []meshKeyRow
	if err := tx.Raw(q, meshID).Scan(&rows).Error; err != nil {
		return nil, fmt.Errorf("load mesh %s: %w", meshID, err)
	}
	if len(rows) == 0 {
		return nil, nil
	}
	r := rows[0]
	return &r, nil
}

// NewMeshKeys makes what a mesh needs to issue invites: an owner signing
// key pair (hex, libsodium layout) and a 32-byte root key (base64url
// without padding, as mesh.root_key holds it).
func NewMeshKeys() (ownerPubkey, ownerSecretKey, rootKey string, err error) {
	pub, sk, err := ed25519.GenerateKey(nil)
	if err != nil {
		return "", "", "", fmt.Errorf("generate owner key: %w", err)
	}
	var root [32]byte
	if _, err := rand.Read(root[:]); err != nil {
		return "", "", "", fmt.Errorf("generate root key: %w", err)
	}
	return hex.EncodeToString(pub), hex.EncodeToString(sk), base64.RawURLEncoding.EncodeToString(root[:]), nil
}

// Create issues an invite of meshID usable through both protocols. A mesh
// without an owner secret key or root key (one made before `mesh create`
// generated them) gets a fresh pair first, as the reference's CLI route
// does.
func (s *InviteService) Create(ctx context.Context, meshID string, o InviteOptions) (IssuedInvite, error) {
	if o.Role == "" {
		o.Role = "member"
	}
	if o.TTL == 0 {
		o.TTL = defaultInviteTTL
	}
	switch {
	case o.Role != "admin" && o.Role != "member":
		return IssuedInvite{}, newError(protocol.CodeInvalidArgument, "role must be admin or member")
	case o.MaxUses < 1 || o.MaxUses > maxInviteUses:
		return IssuedInvite{}, newError(protocol.CodeInvalidArgument, fmt.Sprintf("max uses must be between 1 and %d", maxInviteUses))
	case o.TTL < time.Second || o.TTL > maxInviteTTL:
		return IssuedInvite{}, newError(protocol.CodeInvalidArgument, "expiry must be between 1s and 366 days")
	}
	if u, err := url.Parse(o.BrokerURL); err != nil || (u.Scheme != "ws" && u.Scheme != "wss") || u.Host == "" || strings.Contains(o.BrokerURL, "|") {
		return IssuedInvite{}, newError(protocol.CodeInvalidArgument, "broker URL must be a ws:// or wss:// URL")
	}
	var out IssuedInvite
	err := s.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		m, err := s.loadMesh(tx, meshID, true)
		if err != nil {
			return err
		}
		if m == nil {
			return newError(protocol.CodeNotFound, "no mesh "+meshID)
		}
		if m.ArchivedAt != nil {
			return newError(protocol.CodeInvalidArgument, "mesh "+meshID+" is archived")
		}
		if m.OwnerSecretKey == nil || m.RootKey == nil || m.OwnerPubkey == nil {
			pub, sk, root, err := NewMeshKeys()
			if err != nil {
				return err
			}
			if err := tx.Exec("UPDATE "+s.db.Table("mesh")+" SET owner_pubkey = ?, owner_secret_key = ?, root_key = ? WHERE id = ?", pub, sk, root, meshID).Error; err != nil {
				return fmt.Errorf("store mesh keys: %w", err)
			}
			m.OwnerPubkey, m.OwnerSecretKey, m.RootKey = &pub, &sk, &root
		}
		owner, err := hex.DecodeString(*m.OwnerSecretKey)
		if err != nil || len(owner) != ed25519.PrivateKeySize {
			return newError(protocol.CodeInvalidArgument, "mesh owner_secret_key is not 128 hex characters")
		}
		ownerKey := ed25519.PrivateKey(owner)
		if protocol.PubkeyHex(ownerKey) != strings.ToLower(*m.OwnerPubkey) {
			return newError(protocol.CodeInvalidArgument, "mesh owner_secret_key does not match owner_pubkey")
		}
		expires := s.now().Add(o.TTL).UTC().Truncate(time.Second)
		payload := protocol.InvitePayload{
			V: 1, MeshID: m.ID, MeshSlug: m.Slug, BrokerURL: o.BrokerURL, ExpiresAt: float64(expires.Unix()),
			MeshRootKey: *m.RootKey, Role: o.Role, OwnerPubkey: *m.OwnerPubkey,
		}
		id, code := models.NewID(), randomBase62(inviteCodeLength)
		canonical := protocol.InviteV1SigningString(payload)
		payload.Signature, payload.InviteID = protocol.Sign(ownerKey, canonical), id
		raw, err := json.Marshal(payload)
		if err != nil {
			return err
		}
		token := base64.RawURLEncoding.EncodeToString(raw)
		capRaw, err := json.Marshal(protocol.InviteCapabilityV2{
			Canonical: protocol.InviteV2SigningString(m.ID, id, expires.Unix(), o.Role, *m.OwnerPubkey),
		})
		if err != nil {
			return err
		}
		var capability protocol.InviteCapabilityV2
		_ = json.Unmarshal(capRaw, &capability)
		capability.Signature = protocol.Sign(ownerKey, capability.Canonical)
		capRaw, _ = json.Marshal(capability)
		if err := tx.Exec("INSERT INTO "+s.db.Table("invite")+
			" (id, mesh_id, token, token_bytes, code, max_uses, used_count, role, expires_at, created_by, created_at, version, capability_v2) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, 2, ?)",
			id, m.ID, token, canonical, code, o.MaxUses, o.Role, expires, m.OwnerUserID, s.now().UTC(), string(capRaw)).Error; err != nil {
			return fmt.Errorf("insert invite: %w", err)
		}
		out = IssuedInvite{ID: id, Link: "ic://join/" + token, Code: code, ExpiresAt: protocol.ISO(expires), Role: o.Role, MaxUses: o.MaxUses}
		return nil
	})
	if err != nil {
		return IssuedInvite{}, err
	}
	return out, nil
}

// List returns the mesh's invites, newest first.
func (s *InviteService) List(ctx context.Context, meshID string) ([]InviteInfo, error) {
	var rows []struct {
		ID        string
		Code      *string
		Role      string
		MaxUses   int
		UsedCount int
		Version   int
		ExpiresAt time.Time
		CreatedAt time.Time
		RevokedAt *time.Time
	}
	if err := s.db.WithContext(ctx).Raw("SELECT id, code, role, max_uses, used_count, version, expires_at, created_at, revoked_at FROM "+s.db.Table("invite")+
		" WHERE mesh_id = ? ORDER BY created_at DESC, id", meshID).Scan(&rows).Error; err != nil {
		return nil, fmt.Errorf("list invites of %s: %w", meshID, err)
	}
	out := make([]InviteInfo, 0, len(rows))
	for _, r := range rows {
		i := InviteInfo{ID: r.ID, Code: r.Code, Role: r.Role, MaxUses: r.MaxUses, UsedCount: r.UsedCount, Version: r.Version,
			ExpiresAt: protocol.ISO(r.ExpiresAt), CreatedAt: protocol.ISO(r.CreatedAt)}
		if r.RevokedAt != nil {
			t := protocol.ISO(*r.RevokedAt)
			i.RevokedAt = &t
		}
		out = append(out, i)
	}
	return out, nil
}

// Revoke sets revoked_at on the mesh's invite with that id or code.
func (s *InviteService) Revoke(ctx context.Context, meshID, ref string) error {
	res := s.db.WithContext(ctx).Exec("UPDATE "+s.db.Table("invite")+" SET revoked_at = ? WHERE mesh_id = ? AND (id = ? OR code = ?) AND revoked_at IS NULL",
		s.now().UTC(), meshID, ref, ref)
	if res.Error != nil {
		return fmt.Errorf("revoke invite: %w", res.Error)
	}
	if res.RowsAffected == 0 {
		return newError(protocol.CodeNotFound, "no unrevoked invite "+ref+" in mesh "+meshID)
	}
	return nil
}

// JoinV1Request is POST /join with its strings extracted.
type JoinV1Request struct {
	Token       string
	Payload     json.RawMessage
	PeerPubkey  string
	DisplayName string
}

// JoinResult is a successful redemption.
type JoinResult struct {
	MeshID        string
	MemberID      string
	AlreadyMember bool
}

type inviteRow struct {
	ID           string
	MeshID       string
	Token        string
	MaxUses      int
	UsedCount    int
	Role         string
	Preset       models.JSON
	ExpiresAt    time.Time
	RevokedAt    *time.Time
	Version      int
	CapabilityV2 *string
}

func (s *InviteService) loadInvite(tx *gorm.DB, column, value string) (*inviteRow, error) {
	var rows []inviteRow
	if err := tx.Raw("SELECT id, mesh_id, token, max_uses, used_count, role, preset, expires_at, revoked_at, version, capability_v2 FROM "+
		s.db.Table("invite")+" WHERE "+column+" = ? LIMIT 1", value).Scan(&rows).Error; err != nil {
		return nil, fmt.Errorf("load invite: %w", err)
	}
	if len(rows) == 0 {
		return nil, nil
	}
	r := rows[0]
	return &r, nil
}

func decodeV1Token(token string) (protocol.InvitePayload, error) {
	var p protocol.InvitePayload
	raw, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(token, "="))
	if err != nil {
		return p, err
	}
	return p, json.Unmarshal(raw, &p)
}

// JoinV1 redeems a v1 invite: the token must be a stored invite's, the
// payload the client sent must be the token's own, signed by the mesh's
// owner key and agreeing with the stored row (mesh, role, expiry, root
// key). An active member with the same key gets its member id back
// (alreadyMember) without spending a use; a revoked one is refused.
func (s *InviteService) JoinV1(ctx context.Context, req JoinV1Request) (JoinResult, error) {
	switch {
	case req.Token == "" || len(req.Payload) == 0 || req.PeerPubkey == "" || req.DisplayName == "":
		return JoinResult{}, refuse(http.StatusBadRequest, "invite_token, invite_payload, peer_pubkey, display_name required")
	case len(req.Token) > maxInviteToken || !inviteTokenRE.MatchString(strings.TrimRight(req.Token, "=")):
		return JoinResult{}, refuse(http.StatusBadRequest, "invite_token must be base64url")
	case !protocol.IsLowerHex(req.PeerPubkey, 64):
		return JoinResult{}, refuse(http.StatusBadRequest, "peer_pubkey must be 64 lowercase hex chars (32 bytes)")
	case len(req.DisplayName) > maxDisplayName || !validText(req.DisplayName):
		return JoinResult{}, refuse(http.StatusBadRequest, fmt.Sprintf("display_name must be at most %d characters of text", maxDisplayName))
	}
	if _, err := hex.DecodeString(req.PeerPubkey); err != nil {
		return JoinResult{}, refuse(http.StatusBadRequest, "peer_pubkey must be 64 hex chars (32 bytes)")
	}
	signed, err := decodeV1Token(req.Token)
	if err != nil {
		return JoinResult{}, refuse(http.StatusBadRequest, "invite_malformed")
	}
	var sent protocol.InvitePayload
	if err := json.Unmarshal(req.Payload, &sent); err != nil {
		return JoinResult{}, refuse(http.StatusBadRequest, "invite_malformed")
	}
	if sent != signed {
		return JoinResult{}, refuse(http.StatusBadRequest, "invite_payload_mismatch")
	}
	if signed.V != 1 || (signed.Role != "admin" && signed.Role != "member") || !protocol.IsHex(signed.OwnerPubkey, 64) || !protocol.IsHex(signed.Signature, 128) {
		return JoinResult{}, refuse(http.StatusBadRequest, "invite_malformed")
	}
	if ok, err := protocol.Verify(signed.OwnerPubkey, protocol.InviteV1SigningString(signed), signed.Signature); err != nil || !ok {
		return JoinResult{}, refuse(http.StatusBadRequest, "invite_bad_signature")
	}
	var out JoinResult
	err = s.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		inv, err := s.loadInvite(tx, "token", req.Token)
		if err != nil {
			return err
		}
		if inv == nil {
			return refuse(http.StatusNotFound, "invite_not_found")
		}
		if inv.MeshID != signed.MeshID {
			return refuse(http.StatusBadRequest, "invite_mesh_mismatch")
		}
		m, err := s.loadMesh(tx, inv.MeshID, true)
		if err != nil {
			return err
		}
		if m == nil || m.ArchivedAt != nil {
			return refuse(http.StatusNotFound, "mesh_not_found")
		}
		if m.OwnerPubkey == nil {
			return refuse(http.StatusBadRequest, "mesh_missing_owner_key")
		}
		if !strings.EqualFold(*m.OwnerPubkey, signed.OwnerPubkey) {
			return refuse(http.StatusBadRequest, "invite_owner_mismatch")
		}
		if signed.Role != inv.Role || signed.ExpiresAt != float64(inv.ExpiresAt.Unix()) || m.RootKey == nil || signed.MeshRootKey != *m.RootKey {
			return refuse(http.StatusBadRequest, "invite_payload_mismatch")
		}
		if err := s.checkLive(inv); err != nil {
			return err
		}
		id, already, err := s.existingMember(tx, inv.MeshID, req.PeerPubkey)
		if err != nil {
			return err
		}
		if already {
			out = JoinResult{MeshID: inv.MeshID, MemberID: id, AlreadyMember: true}
			return nil
		}
		if err := s.spend(tx, inv, nil); err != nil {
			return err
		}
		id, err = s.insertMember(tx, inv, req.PeerPubkey, req.DisplayName)
		if err != nil {
			return err
		}
		out = JoinResult{MeshID: inv.MeshID, MemberID: id}
		return nil
	})
	if err != nil {
		return JoinResult{}, err
	}
	s.joined(out.MeshID)
	return out, nil
}

// ClaimV2 redeems a v2 code for the holder of the x25519 key recipient
// (base64url, 32 bytes): it spends a use, creates a member whose
// peer_pubkey is that key (as the reference does; the CLI's first hello
// binds its ed25519 key, see BindClaimedMember), and returns the mesh root
// key sealed to recipient with crypto_box_seal.
func (s *InviteService) ClaimV2(ctx context.Context, code, recipient, displayName string) (protocol.ClaimReply, error) {
	if !inviteCodeRE.MatchString(code) {
		return protocol.ClaimReply{}, refuse(http.StatusBadRequest, "malformed")
	}
	pk, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(recipient, "="))
	if err != nil || len(pk) != 32 {
		return protocol.ClaimReply{}, refuse(http.StatusBadRequest, "malformed")
	}
	if len(displayName) > maxDisplayName || !validText(displayName) {
		return protocol.ClaimReply{}, refuse(http.StatusBadRequest, "malformed")
	}
	var recipientKey [32]byte
	copy(recipientKey[:], pk)
	recipient = base64.RawURLEncoding.EncodeToString(pk) // one spelling per key
	var out protocol.ClaimReply
	err = s.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		inv, err := s.loadInvite(tx, "code", code)
		if err != nil {
			return err
		}
		if inv == nil {
			return refuse(http.StatusNotFound, "not_found")
		}
		m, err := s.loadMesh(tx, inv.MeshID, true)
		if err != nil {
			return err
		}
		if m == nil || m.ArchivedAt != nil {
			return refuse(http.StatusNotFound, "not_found")
		}
		if err := s.checkLive(inv); err != nil {
			// v2 words these without the prefix.
			ie, _ := AsRouteError(err)
			return refuse(ie.Status, strings.TrimPrefix(ie.Code, "invite_"))
		}
		if m.OwnerPubkey == nil || m.RootKey == nil {
			return refuse(http.StatusBadRequest, "malformed")
		}
		root, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(*m.RootKey, "="))
		if err != nil || len(root) != 32 {
			return refuse(http.StatusBadRequest, "malformed")
		}
		canonical := protocol.InviteV2SigningString(inv.MeshID, inv.ID, inv.ExpiresAt.Unix(), inv.Role, *m.OwnerPubkey)
		// Unlike the reference, a row without a v2 capability is refused:
		// nothing the owner signed says this code may be claimed.
		var capability protocol.InviteCapabilityV2
		if inv.CapabilityV2 == nil || json.Unmarshal([]byte(*inv.CapabilityV2), &capability) != nil || capability.Canonical != canonical {
			return refuse(http.StatusBadRequest, "bad_signature")
		}
		if ok, err := protocol.Verify(*m.OwnerPubkey, canonical, capability.Signature); err != nil || !ok {
			return refuse(http.StatusBadRequest, "bad_signature")
		}
		sealed, err := box.SealAnonymous(nil, root, &recipientKey, rand.Reader)
		if err != nil {
			return fmt.Errorf("seal root key: %w", err)
		}
		out = protocol.ClaimReply{SealedRootKey: base64.RawURLEncoding.EncodeToString(sealed), MeshID: inv.MeshID, OwnerPubkey: *m.OwnerPubkey, CanonicalV2: canonical}
		id, already, err := s.existingMember(tx, inv.MeshID, recipient)
		if err != nil {
			return err
		}
		if already {
			out.MemberID, out.AlreadyMember = id, true
			return nil
		}
		if err := s.spend(tx, inv, &recipient); err != nil {
			// A claim that lost the race for the last use.
			ie, _ := AsRouteError(err)
			return refuse(ie.Status, strings.TrimPrefix(ie.Code, "invite_"))
		}
		if displayName == "" {
			displayName = "member-" + recipient[:8]
		}
		out.MemberID, err = s.insertMember(tx, inv, recipient, displayName)
		return err
	})
	if err != nil {
		return protocol.ClaimReply{}, err
	}
	s.joined(out.MeshID)
	return out, nil
}

// checkLive refuses a revoked or expired invite. Both are checked again,
// with the use count, atomically when a use is spent; a repeat by an
// existing member is answered between the two, so it works on a used-up
// invite too.
func (s *InviteService) checkLive(inv *inviteRow) error {
	switch {
	case inv.RevokedAt != nil:
		return refuse(http.StatusGone, "invite_revoked")
	case !s.now().Before(inv.ExpiresAt):
		return refuse(http.StatusGone, "invite_expired")
	}
	return nil
}

// existingMember finds a member of meshID with peer_pubkey key: an active
// one is returned (a repeat), a revoked one refused.
func (s *InviteService) existingMember(tx *gorm.DB, meshID, key string) (string, bool, error) {
	var rows []struct {
		ID        string
		RevokedAt *time.Time
	}
	if err := tx.Raw("SELECT id, revoked_at FROM "+s.db.Table("member")+" WHERE mesh_id = ? AND peer_pubkey = ? ORDER BY revoked_at IS NOT NULL", meshID, key).Scan(&rows).Error; err != nil {
		return "", false, fmt.Errorf("look up member: %w", err)
	}
	if len(rows) == 0 {
		return "", false, nil
	}
	if rows[0].RevokedAt == nil {
		return rows[0].ID, true, nil
	}
	return "", false, refuse(http.StatusForbidden, "pubkey_revoked")
}

// spend takes one use of inv, or refuses if none is left at this instant.
func (s *InviteService) spend(tx *gorm.DB, inv *inviteRow, claimedBy *string) error {
	set := "used_count = used_count + 1"
	args := []any{}
	if claimedBy != nil {
		set += ", claimed_by_pubkey = ?"
		args = append(args, *claimedBy)
	}
	args = append(args, inv.ID, s.now().UTC())
	res := tx.Exec("UPDATE "+s.db.Table("invite")+" SET "+set+" WHERE id = ? AND used_count < max_uses AND revoked_at IS NULL AND expires_at > ?", args...)
	if res.Error != nil {
		return fmt.Errorf("spend invite use: %w", res.Error)
	}
	if res.RowsAffected != 1 {
		return refuse(http.StatusGone, "invite_exhausted")
	}
	return nil
}

type invitePreset struct {
	DisplayName *string          `json:"displayName"`
	RoleTag     *string          `json:"roleTag"`
	Groups      []protocol.Group `json:"groups"`
	MessageMode *string          `json:"messageMode"`
}

// insertMember creates the member an invite admits, with the invite's role
// and preset, subscribed to the mesh's #general topic.
func (s *InviteService) insertMember(tx *gorm.DB, inv *inviteRow, pubkey, displayName string) (string, error) {
	var preset invitePreset
	if len(inv.Preset) > 0 {
		_ = json.Unmarshal(inv.Preset, &preset) // a malformed preset is no preset
	}
	if preset.DisplayName != nil && *preset.DisplayName != "" {
		displayName = *preset.DisplayName
	}
	mode := "push"
	if preset.MessageMode != nil {
		mode = *preset.MessageMode
	}
	groups := preset.Groups
	if groups == nil {
		groups = []protocol.Group{}
	}
	groupsRaw, _ := json.Marshal(groups)
	id, now := models.NewID(), s.now().UTC()
	if err := tx.Exec("INSERT INTO "+s.db.Table("member")+" (id, mesh_id, peer_pubkey, display_name, role, role_tag, default_groups, message_mode, joined_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
		id, inv.MeshID, pubkey, displayName, inv.Role, preset.RoleTag, models.JSON(groupsRaw), mode, now).Error; err != nil {
		return "", fmt.Errorf("insert member: %w", err)
	}
	topic := s.db.Table("topic")
	if err := tx.Exec("INSERT INTO "+topic+" (id, mesh_id, name, description, visibility, created_at) VALUES (?, ?, 'general', ?, 'public', ?) ON CONFLICT (mesh_id, name) DO NOTHING",
		models.NewID(), inv.MeshID, generalTopicDescription, now).Error; err != nil {
		return "", fmt.Errorf("ensure #general: %w", err)
	}
	if err := tx.Exec("INSERT INTO "+s.db.Table("topic_member")+" (topic_id, member_id, role, joined_at) SELECT id, ?, 'member', ? FROM "+topic+
		" WHERE mesh_id = ? AND name = 'general' ON CONFLICT (topic_id, member_id) DO NOTHING", id, now, inv.MeshID).Error; err != nil {
		return "", fmt.Errorf("subscribe to #general: %w", err)
	}
	return id, nil
}

const generalTopicDescription = "Default mesh-wide channel. Every member can read and post."

func (s *InviteService) joined(meshID string) {
	if s.members != nil && meshID != "" {
		s.members.Invalidate(meshID)
	}
}

// BindClaimedMember gives a v2-claimed member its ed25519 key. A v2 claim
// creates the member under the claimant's x25519 key (all the CLI sends),
// then the CLI says hello as that member id with a fresh ed25519 key. The
// first signed hello naming a member whose peer_pubkey is not an ed25519
// key binds it, with one conditional UPDATE, so of two racing hellos one
// binds and the other is refused. The member id is the proof: it is
// returned only to the claimant, and unbound members are left out of every
// listing (members, topic members). A key that is already a member of the
// mesh is never bound a second time. It reports whether it bound.
//
// The CLI's claim sends no name, so the claim names the member
// "member-<key prefix>"; a member still so named takes name (the hello's
// display name or hostname) when it binds.
func (d *MemberDirectory) BindClaimedMember(ctx context.Context, meshID, memberID, pubkey, name string) (bool, error) {
	if memberID == "" || !protocol.IsLowerHex(pubkey, 64) {
		return false, nil
	}
	if len(name) > maxDisplayName || !validText(name) {
		name = ""
	}
	mem := d.db.Table("member")
	res := d.db.WithContext(ctx).Exec("UPDATE "+mem+" SET peer_pubkey = ?, display_name = CASE WHEN ? <> '' AND display_name = 'member-' || substr(peer_pubkey, 1, 8) THEN ? ELSE display_name END"+
		" WHERE id = ? AND mesh_id = ? AND revoked_at IS NULL AND length(peer_pubkey) <> 64"+
		" AND NOT EXISTS (SELECT 1 FROM "+mem+" other WHERE other.mesh_id = ? AND other.peer_pubkey = ?)", pubkey, name, name, memberID, meshID, meshID, pubkey)
	if res.Error != nil {
		return false, fmt.Errorf("bind claimed member %s: %w", memberID, res.Error)
	}
	if res.RowsAffected == 0 {
		return false, nil
	}
	d.Invalidate(meshID)
	d.mu.Lock()
	delete(d.keys, memberID) // the one key change there is: drop a cached claim key
	d.mu.Unlock()
	return true, nil
}

// boundMemberSQL holds for a member row (alias m) with an ed25519 key, i.e.
// not a v2 claim still waiting for its first hello.
const boundMemberSQL = "length(m.peer_pubkey) = 64"

// validText is text both dialects can store (H11): valid UTF-8 without NUL.
func validText(s string) bool {
	return utf8.ValidString(s) && !strings.ContainsRune(s, 0)
}

func randomBase62(n int) string {
	const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	out := make([]byte, n)
	max := big.NewInt(int64(len(alphabet)))
	for i := range out {
		v, err := rand.Int(rand.Reader, max)
		if err != nil {
			panic(err) // crypto/rand does not fail on supported platforms
		}
		out[i] = alphabet[v.Int64()]
	}
	return string(out)
}
