package services

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// MemberAPI serves the member HTTP routes: GET /mesh/:id/members,
// PATCH /mesh/:id/member/:id and PATCH /mesh/:id/settings.
//
// Who the caller is: the reference trusts nothing (GET) or an X-Member-Id
// header anyone can write (PATCH). Here a caller is a member of the mesh
// only if it proves it, in one of two ways (Authenticate):
//
//   - a signed request: X-Member-Id, X-Claudemesh-Timestamp (ms) and
//     X-Claudemesh-Signature, an ed25519 signature by the member's key over
//     protocol.MemberRequestSigningString (method, path, timestamp, body hash),
//     within the hello skew. This is the strong proof; package client
//     sends it.
//   - a live session (MEMBER_API_SESSION_AUTH, on by default): the
//     claudemesh CLI signs nothing, so an unsigned request is accepted if a
//     socket that completed a signed hello as that member (X-Member-Id), or
//     for GET as any member of the mesh, is online in this process from the
//     same IP address as the request, and the request is no browser's (it
//     has no Origin header: a web page the member opens shares the
//     address; Bun's and Node's fetch send none). That ties the call to a
//     key holder's machine rather than to a guessable id; its limit is that everyone
//     behind that address (a shared host, a NAT) counts as the member while
//     its session is up. Operators who do not run the CLI's profile verbs
//     turn it off.
//
// What a caller may change: a member edits its own profile fields that
// the mesh's self_editable policy allows; an admin (role admin, or the
// mesh owner's user) edits any member's fields and permission, and the
// mesh settings. Members waiting for their first hello after a v2 claim
// are never listed.
//
// Concurrency: no state of its own; an update is one UPDATE and the
// profile_updated push goes to the sockets the registry holds right after
// it.
type MemberAPI struct {
	db          *models.DB
	presence    *PresenceService
	members     *MemberDirectory
	now         func() time.Time
	skew        time.Duration
	sessionAuth bool
}

// NewMemberAPI makes the service. skew bounds a signed request's timestamp;
// sessionAuth enables the live-session fallback.
func NewMemberAPI(db *models.DB, presence *PresenceService, members *MemberDirectory, now func() time.Time, skew time.Duration, sessionAuth bool) *MemberAPI {
	return &MemberAPI{db: db, presence: presence, members: members, now: now, skew: skew, sessionAuth: sessionAuth}
}

// MemberRequest is an HTTP call to a member route, as the edge read it.
type MemberRequest struct {
	MeshID    string
	MemberID  string // X-Member-Id; "" when absent
	Timestamp string // X-Claudemesh-Timestamp
	Signature string // X-Claudemesh-Signature
	Method    string
	Path      string
	Body      []byte
	RemoteIP  string // the client's address as the edge derives it (handlers' clientAddr); "" when unknown
	Origin    string // the Origin header: set by browsers, never by the CLI
}

// remoteIPer is what an Outbox of a real socket also is.
type remoteIPer interface{ RemoteIP() string }

// Authenticate returns the calling member, or refuses: 401 without a
// proof, 403 for a proof that does not hold.
func (a *MemberAPI) Authenticate(ctx context.Context, r MemberRequest) (*MemberRow, error) {
	if r.Signature != "" || r.Timestamp != "" {
		return a.authenticateSigned(ctx, r)
	}
	if !a.sessionAuth {
		return nil, refuse(http.StatusUnauthorized, "signed request required (X-Member-Id, X-Claudemesh-Timestamp, X-Claudemesh-Signature)")
	}
	unproven := refuse(http.StatusUnauthorized, "no proof of membership: sign the request, or call from the machine of a live session of this member (claudemesh daemon up)")
	// A browser on the member's machine shares its address, and the routes
	// answer every origin (CORS *): any page it opens would pass for the
	// member. Browsers name the page's origin; the CLI sends none.
	if r.Origin != "" {
		return nil, refuse(http.StatusUnauthorized, "a request from a browser (Origin header) must be signed")
	}
	if r.RemoteIP == "" {
		return nil, unproven
	}
	// Only a GET may stand for any member at the address; a change names
	// its caller (the CLI's PATCH always sends X-Member-Id).
	if r.MemberID == "" && r.Method != http.MethodGet {
		return nil, unproven
	}
	for _, v := range a.presence.Peers(r.MeshID, nil) {
		if v.Out == nil || (r.MemberID != "" && v.Conn.MemberID != r.MemberID) {
			continue
		}
		ip, ok := v.Out.(remoteIPer)
		if !ok || ip.RemoteIP() != r.RemoteIP {
			continue
		}
		m, err := a.activeMember(ctx, r.MeshID, v.Conn.MemberID)
		if err != nil {
			return nil, err
		}
		if m != nil {
			return m, nil
		}
	}
	return nil, unproven
}

func (a *MemberAPI) authenticateSigned(ctx context.Context, r MemberRequest) (*MemberRow, error) {
	ts, err := strconv.ParseInt(r.Timestamp, 10, 64)
	if err != nil || r.MemberID == "" || !protocol.IsHex(r.Signature, 128) {
		return nil, refuse(http.StatusUnauthorized, "a signed request needs X-Member-Id, X-Claudemesh-Timestamp (ms) and X-Claudemesh-Signature (128 hex)")
	}
	if d := a.now().Sub(time.UnixMilli(ts)); math.Abs(float64(d)) > float64(a.skew) {
		return nil, refuse(http.StatusUnauthorized, "request timestamp outside the accepted skew")
	}
	m, err := a.activeMember(ctx, r.MeshID, r.MemberID)
	if err != nil {
		return nil, err
	}
	if m == nil {
		return nil, refuse(http.StatusForbidden, "not a member of this mesh")
	}
	ok, err := protocol.Verify(m.PeerPubkey, protocol.MemberRequestSigningString(r.MeshID, r.MemberID, r.Method, r.Path, ts, r.Body), r.Signature)
	if err != nil || !ok {
		return nil, refuse(http.StatusForbidden, "bad signature")
	}
	return m, nil
}

// activeMember is the bound, unrevoked member id of meshID, or nil.
func (a *MemberAPI) activeMember(ctx context.Context, meshID, memberID string) (*MemberRow, error) {
	m, err := a.members.ByID(ctx, memberID)
	if err != nil {
		return nil, err
	}
	if m == nil || m.MeshID != meshID || m.RevokedAt != nil || len(m.PeerPubkey) != 64 {
		return nil, nil
	}
	return m, nil
}

// MemberEntry is one member as the member routes show it.
type MemberEntry struct {
	ID              string           `json:"id"`
	DisplayName     string           `json:"displayName"`
	RoleTag         *string          `json:"roleTag"`
	Groups          []protocol.Group `json:"groups"`
	MessageMode     *string          `json:"messageMode"`
	Permission      string           `json:"permission"`
	DashboardUserID *string          `json:"dashboardUserId"`
	JoinedAt        string           `json:"joinedAt"`
	LastSeenAt      *string          `json:"lastSeenAt,omitempty"`
	Online          *bool            `json:"online,omitempty"`
	SessionCount    *int             `json:"sessionCount,omitempty"`
}

type memberProfileRow struct {
	ID              string
	DisplayName     string
	RoleTag         *string
	DefaultGroups   models.JSON
	MessageMode     *string
	Role            string
	DashboardUserID *string
	JoinedAt        time.Time
	LastSeenAt      *time.Time
	Sessions        int // active presence rows; only ListMembers selects it
}

func (r memberProfileRow) entry() MemberEntry {
	e := MemberEntry{ID: r.ID, DisplayName: r.DisplayName, RoleTag: r.RoleTag, MessageMode: r.MessageMode, Permission: r.Role,
		DashboardUserID: r.DashboardUserID, JoinedAt: protocol.ISO(r.JoinedAt)}
	e.Groups, _ = protocol.ParseGroups(json.RawMessage(r.DefaultGroups))
	if e.Groups == nil {
		e.Groups = []protocol.Group{}
	}
	if r.LastSeenAt != nil {
		s := protocol.ISO(*r.LastSeenAt)
		e.LastSeenAt = &s
	}
	return e
}

const memberProfileColumns = "m.id, m.display_name, m.role_tag, m.default_groups, m.message_mode, m.role, m.dashboard_user_id, m.joined_at, m.last_seen_at"

// ListMembers lists the mesh's active members with their online state
// (active presence rows, any broker process's).
func (a *MemberAPI) ListMembers(ctx context.Context, meshID string) ([]MemberEntry, error) {
	var rows []memberProfileRow
	err := a.db.WithContext(ctx).Raw("SELECT "+memberProfileColumns+", (SELECT count(*) FROM "+a.db.Table("presence")+" p WHERE p.member_id = m.id AND p.disconnected_at IS NULL) AS sessions FROM "+
		a.db.Table("member")+" m WHERE m.mesh_id = ? AND m.revoked_at IS NULL AND "+boundMemberSQL+" ORDER BY m.joined_at, m.id", meshID).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("list members of %s: %w", meshID, err)
	}
	out := make([]MemberEntry, 0, len(rows))
	for _, r := range rows {
		e := r.entry()
		online, n := r.Sessions > 0, r.Sessions
		e.Online, e.SessionCount = &online, &n
		out = append(out, e)
	}
	return out, nil
}

// SelfEditable is mesh.self_editable: which profile fields a member may
// change on itself.
type SelfEditable struct {
	DisplayName bool `json:"displayName"`
	RoleTag     bool `json:"roleTag"`
	Groups      bool `json:"groups"`
	MessageMode bool `json:"messageMode"`
}

// MemberUpdate is a parsed PATCH /mesh/:id/member/:id body; nil is "not
// sent". RoleTag may be sent as null to clear it (ClearRoleTag).
type MemberUpdate struct {
	DisplayName  *string
	RoleTag      *string
	ClearRoleTag bool
	Groups       *[]protocol.Group
	MessageMode  *string
	Permission   *string
}

// ParseMemberUpdate validates a PATCH body: an object of the five known
// fields, each of its type.
func ParseMemberUpdate(body []byte) (MemberUpdate, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil || raw == nil {
		return MemberUpdate{}, refuse(http.StatusBadRequest, "body must be a JSON object")
	}
	var u MemberUpdate
	for k, v := range raw {
		switch k {
		case "displayName":
			s, ok := protocol.RawString(v)
			if !ok || strings.TrimSpace(s) == "" || len(s) > maxDisplayName || !validText(s) {
				return u, refuse(http.StatusBadRequest, fmt.Sprintf("displayName must be a non-empty string of at most %d characters", maxDisplayName))
			}
			u.DisplayName = &s
		case "roleTag":
			if string(bytes.TrimSpace(v)) == "null" {
				u.ClearRoleTag = true
				continue
			}
			s, ok := protocol.RawString(v)
			if !ok || len(s) > maxDisplayName || !validText(s) {
				return u, refuse(http.StatusBadRequest, "roleTag must be a string or null")
			}
			u.RoleTag = &s
		case "groups":
			var gs []protocol.Group
			if err := json.Unmarshal(v, &gs); err != nil || gs == nil || len(gs) > 64 {
				return u, refuse(http.StatusBadRequest, "groups must be an array of at most 64 {name, role?}")
			}
			for _, g := range gs {
				if g.Name == "" || len(g.Name) > maxDisplayName || !validText(g.Name) || !validText(g.Role) || len(g.Role) > maxDisplayName {
					return u, refuse(http.StatusBadRequest, "each group needs a non-empty name")
				}
			}
			u.Groups = &gs
		case "messageMode":
			s, _ := protocol.RawString(v)
			if s != "push" && s != "inbox" && s != "off" {
				return u, refuse(http.StatusBadRequest, "messageMode must be push, inbox or off")
			}
			u.MessageMode = &s
		case "permission":
			s, _ := protocol.RawString(v)
			if s != "admin" && s != "member" {
				return u, refuse(http.StatusBadRequest, "permission must be admin or member")
			}
			u.Permission = &s
		default:
			return u, refuse(http.StatusBadRequest, "unknown field "+strconv.Quote(k))
		}
	}
	return u, nil
}

// MemberUpdated is a successful PATCH: the member after it and the
// profile fields that changed (the profile_updated push's eventData).
type MemberUpdated struct {
	OK      bool           `json:"ok"`
	Member  MemberEntry    `json:"member"`
	Changes map[string]any `json:"changes"`
}

func (a *MemberAPI) isAdmin(ctx context.Context, caller *MemberRow) (bool, error) {
	return a.members.IsModerator(ctx, caller.MeshID, caller.ID)
}

func (a *MemberAPI) policy(ctx context.Context, meshID string) (SelfEditable, error) {
	p := SelfEditable{DisplayName: true, RoleTag: true, Groups: true, MessageMode: true}
	var raw []models.JSON
	if err := a.db.WithContext(ctx).Raw("SELECT self_editable FROM "+a.db.Table("mesh")+" WHERE id = ?", meshID).Scan(&raw).Error; err != nil {
		return p, fmt.Errorf("load mesh policy: %w", err)
	}
	if len(raw) > 0 && len(raw[0]) > 0 && string(raw[0]) != "null" {
		_ = json.Unmarshal(raw[0], &p) // a field the policy leaves out keeps its default
	}
	return p, nil
}

// UpdateMember applies u to target on behalf of caller and pushes
// profile_updated to the target's live sockets.
func (a *MemberAPI) UpdateMember(ctx context.Context, caller *MemberRow, targetID string, u MemberUpdate) (MemberUpdated, error) {
	admin, err := a.isAdmin(ctx, caller)
	if err != nil {
		return MemberUpdated{}, err
	}
	if !admin && targetID != caller.ID {
		return MemberUpdated{}, refuse(http.StatusForbidden, "not authorized — only admins or self can edit")
	}
	target, err := a.activeMember(ctx, caller.MeshID, targetID)
	if err != nil {
		return MemberUpdated{}, err
	}
	if target == nil {
		return MemberUpdated{}, refuse(http.StatusNotFound, "member not found")
	}
	if !admin {
		pol, err := a.policy(ctx, caller.MeshID)
		if err != nil {
			return MemberUpdated{}, err
		}
		var rejected []string
		if u.DisplayName != nil && !pol.DisplayName {
			rejected = append(rejected, "displayName")
		}
		if (u.RoleTag != nil || u.ClearRoleTag) && !pol.RoleTag {
			rejected = append(rejected, "roleTag")
		}
		if u.Groups != nil && !pol.Groups {
			rejected = append(rejected, "groups")
		}
		if u.MessageMode != nil && !pol.MessageMode {
			rejected = append(rejected, "messageMode")
		}
		if u.Permission != nil {
			rejected = append(rejected, "permission")
		}
		if len(rejected) > 0 {
			return MemberUpdated{}, refuse(http.StatusForbidden, "admin-managed fields: "+strings.Join(rejected, ", "))
		}
	}
	var sets []string
	var args []any
	changes := map[string]any{}
	if u.DisplayName != nil {
		sets, args, changes["displayName"] = append(sets, "display_name = ?"), append(args, *u.DisplayName), *u.DisplayName
	}
	if u.RoleTag != nil || u.ClearRoleTag {
		sets, args, changes["roleTag"] = append(sets, "role_tag = ?"), append(args, u.RoleTag), u.RoleTag
	}
	if u.Groups != nil {
		raw, _ := json.Marshal(*u.Groups)
		sets, args, changes["groups"] = append(sets, "default_groups = ?"), append(args, models.JSON(raw)), *u.Groups
	}
	if u.MessageMode != nil {
		sets, args, changes["messageMode"] = append(sets, "message_mode = ?"), append(args, *u.MessageMode), *u.MessageMode
	}
	if u.Permission != nil {
		sets, args = append(sets, "role = ?"), append(args, *u.Permission)
	}
	if len(sets) == 0 {
		return MemberUpdated{}, refuse(http.StatusBadRequest, "no fields to update")
	}
	args = append(args, target.ID, caller.MeshID)
	res := a.db.WithContext(ctx).Exec("UPDATE "+a.db.Table("member")+" SET "+strings.Join(sets, ", ")+" WHERE id = ? AND mesh_id = ? AND revoked_at IS NULL", args...)
	if res.Error != nil {
		return MemberUpdated{}, fmt.Errorf("update member %s: %w", target.ID, res.Error)
	}
	if res.RowsAffected == 0 {
		return MemberUpdated{}, refuse(http.StatusNotFound, "member not found")
	}
	a.members.Invalidate(caller.MeshID)
	var rows []memberProfileRow
	if err := a.db.WithContext(ctx).Raw("SELECT "+memberProfileColumns+" FROM "+a.db.Table("member")+" m WHERE m.id = ?", target.ID).Scan(&rows).Error; err != nil || len(rows) == 0 {
		return MemberUpdated{}, fmt.Errorf("read back member %s: %v", target.ID, err)
	}
	out := MemberUpdated{OK: true, Member: rows[0].entry(), Changes: changes}
	if len(changes) > 0 {
		a.pushProfileUpdated(caller.MeshID, target.ID, changes)
	}
	return out, nil
}

func (a *MemberAPI) pushProfileUpdated(meshID, memberID string, changes map[string]any) {
	f := protocol.MustEncode(protocol.NewSystemPush(meshID, "profile_updated", "low", changes, protocol.ISO(a.now())))
	for _, v := range a.presence.Peers(meshID, nil) {
		if v.Out != nil && v.Conn.MemberID == memberID {
			v.Out.Offer(f)
		}
	}
}

// ParseSettings validates a PATCH /mesh/:id/settings body.
func ParseSettings(body []byte) (SelfEditable, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil || raw == nil {
		return SelfEditable{}, refuse(http.StatusBadRequest, "body must be a JSON object")
	}
	for k := range raw {
		if k != "selfEditable" {
			return SelfEditable{}, refuse(http.StatusBadRequest, "unknown field "+strconv.Quote(k))
		}
	}
	se, ok := raw["selfEditable"]
	if !ok {
		return SelfEditable{}, refuse(http.StatusBadRequest, "no settings to update")
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(se, &fields); err != nil || fields == nil {
		return SelfEditable{}, refuse(http.StatusBadRequest, "selfEditable must be an object of booleans")
	}
	var p SelfEditable
	targets := map[string]*bool{"displayName": &p.DisplayName, "roleTag": &p.RoleTag, "groups": &p.Groups, "messageMode": &p.MessageMode}
	for k, v := range fields {
		dst, known := targets[k]
		if !known {
			return SelfEditable{}, refuse(http.StatusBadRequest, "unknown selfEditable field "+strconv.Quote(k))
		}
		switch string(bytes.TrimSpace(v)) {
		case "true":
			*dst = true
		case "false":
			*dst = false
		default:
			return SelfEditable{}, refuse(http.StatusBadRequest, "selfEditable."+k+" must be a boolean")
		}
		delete(targets, k)
	}
	if len(targets) > 0 {
		// The policy is replaced whole, as the reference stores it: a field
		// left out would silently become false.
		missing := make([]string, 0, len(targets))
		for k := range targets {
			missing = append(missing, k)
		}
		sort.Strings(missing)
		return SelfEditable{}, refuse(http.StatusBadRequest, "selfEditable is missing "+strings.Join(missing, ", "))
	}
	return p, nil
}

// UpdateSettings replaces the mesh's self_editable policy; admins only.
func (a *MemberAPI) UpdateSettings(ctx context.Context, caller *MemberRow, p SelfEditable) error {
	admin, err := a.isAdmin(ctx, caller)
	if err != nil {
		return err
	}
	if !admin {
		return refuse(http.StatusForbidden, "admin access required")
	}
	raw, _ := json.Marshal(p)
	if err := a.db.WithContext(ctx).Exec("UPDATE "+a.db.Table("mesh")+" SET self_editable = ? WHERE id = ?", models.JSON(raw), caller.MeshID).Error; err != nil {
		return fmt.Errorf("update mesh settings: %w", err)
	}
	return nil
}
