package protocol

import "encoding/json"

// Invites: the signed bytes and the HTTP bodies of `POST /join` (v1) and
// `POST /invites/:code/claim` (v2), as the claudemesh CLI sends and reads
// them (apps/cli/src/services/invite).

// InvitePayload is the JSON inside a v1 link, ic://join/<base64url(JSON)>.
// Field order is the order the link's JSON is written in.
type InvitePayload struct {
	V           int     `json:"v"`
	MeshID      string  `json:"mesh_id"`
	MeshSlug    string  `json:"mesh_slug"`
	BrokerURL   string  `json:"broker_url"`
	ExpiresAt   float64 `json:"expires_at"` // unix seconds
	MeshRootKey string  `json:"mesh_root_key"`
	Role        string  `json:"role"`
	OwnerPubkey string  `json:"owner_pubkey"`
	Signature   string  `json:"signature"`
	// InviteID is meshbroker's own, unsigned: it makes every link's token
	// (the stored lookup key) unique, also for two invites of one mesh with
	// the same role and expiry second. The CLI sends it back unchanged.
	InviteID string `json:"invite_id,omitempty"`
}

// InviteV1SigningString is what the mesh owner key signs for a v1 link:
// every payload field but the signature, joined by "|".
func InviteV1SigningString(p InvitePayload) string {
	return FormatJSNumber(float64(p.V)) + "|" + p.MeshID + "|" + p.MeshSlug + "|" + p.BrokerURL + "|" + FormatJSNumber(p.ExpiresAt) +
		"|" + p.MeshRootKey + "|" + p.Role + "|" + p.OwnerPubkey
}

// InviteV2SigningString is the v2 capability the owner key signs; it holds
// neither the root key nor a broker URL.
func InviteV2SigningString(meshID, inviteID string, expiresAtUnix int64, role, ownerPubkey string) string {
	return "v=2|" + meshID + "|" + inviteID + "|" + FormatJSNumber(float64(expiresAtUnix)) + "|" + role + "|" + ownerPubkey
}

// InviteCapabilityV2 is mesh.invite.capability_v2.
type InviteCapabilityV2 struct {
	Canonical string `json:"canonical"`
	Signature string `json:"signature"`
}

// JoinRequest is the body of POST /join.
type JoinRequest struct {
	InviteToken   json.RawMessage `json:"invite_token"`
	InvitePayload json.RawMessage `json:"invite_payload"`
	PeerPubkey    json.RawMessage `json:"peer_pubkey"`
	DisplayName   json.RawMessage `json:"display_name"`
}

// JoinReply answers POST /join: {ok, memberId, alreadyMember?} or {ok:false, error}.
type JoinReply struct {
	OK            bool   `json:"ok"`
	MemberID      string `json:"memberId,omitempty"`
	AlreadyMember bool   `json:"alreadyMember,omitempty"`
	Error         string `json:"error,omitempty"`
}

// ClaimRequest is the body of POST /invites/:code/claim.
type ClaimRequest struct {
	RecipientX25519Pubkey json.RawMessage `json:"recipient_x25519_pubkey"`
	DisplayName           json.RawMessage `json:"display_name"`
}

// ClaimReply answers a successful claim. AlreadyMember is meshbroker's
// own: the same recipient key claimed before, and nothing was spent.
type ClaimReply struct {
	SealedRootKey string `json:"sealed_root_key"`
	MeshID        string `json:"mesh_id"`
	MemberID      string `json:"member_id"`
	OwnerPubkey   string `json:"owner_pubkey"`
	CanonicalV2   string `json:"canonical_v2"`
	AlreadyMember bool   `json:"alreadyMember,omitempty"`
}

// ClaimErrorReply answers a refused claim: {"error": "not_found"}.
type ClaimErrorReply struct {
	Error string `json:"error"`
}
