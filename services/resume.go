package services

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/claudemesh/meshbroker/models"
)

// ResumeTokens issues and checks resume tokens (01 §11, decision H7): a
// broker-signed, short bearer credential that lets a client reattach its
// own lease without re-signing its hello. Form:
//
//	mesh-resume.v1.<b64url(JSON{sub,mid,prs,exp,iat})>.<b64url(ed25519 sig)>
//
// sub is the key the hello that got the token proved (the member key for a
// member hello, the attested session key for a session hello; never the
// unsigned sessionPubkey label of a member hello), mid the mesh id, prs the
// presence the token resumes; the signature covers everything before the
// last dot. A token resumes only that presence, only while it is a lease of
// that proven key in that mesh, and only for a hello claiming that key
// (handshake_proof.go); a forged, expired, unbound or foreign token is
// ignored and the hello is processed as if it had none. Tokens issued
// before prs existed carry none and are ignored the same way. Old clients
// never send one.
//
// Concurrency: immutable after construction.
type ResumeTokens struct {
	key ed25519.PrivateKey
	ttl time.Duration
	now func() time.Time
}

const resumePrefix = "mesh-resume.v1."

// resumeClaims is a token's payload.
type resumeClaims struct {
	Sub string `json:"sub"` // the key the hello proved
	Mid string `json:"mid"` // mesh id
	Prs string `json:"prs"` // presence id
	Exp int64  `json:"exp"`
	Iat int64  `json:"iat"`
}

// NewResumeTokens uses key (from RESUME_TOKEN_KEY, or LoadResumeKey).
func NewResumeTokens(key ed25519.PrivateKey, ttl time.Duration, now func() time.Time) *ResumeTokens {
	return &ResumeTokens{key: key, ttl: ttl, now: now}
}

// LoadResumeKey returns the signing key: the configured seed (64 hex), or
// the one kept in meshbroker_kv, generated on first use. Concurrent first
// starts agree on one key because the insert does nothing on conflict and
// everyone reads back the stored row.
func LoadResumeKey(ctx context.Context, db *models.DB, seedHex string) (ed25519.PrivateKey, error) {
	if seedHex != "" {
		seed, err := hex.DecodeString(seedHex)
		if err != nil || len(seed) != ed25519.SeedSize {
			return nil, fmt.Errorf("resume token key must be 64 hex characters")
		}
		return ed25519.NewKeyFromSeed(seed), nil
	}
	_, fresh, err := ed25519.GenerateKey(nil)
	if err != nil {
		return nil, fmt.Errorf("generate resume key: %w", err)
	}
	tbl := db.Table("meshbroker_kv")
	if err := db.WithContext(ctx).Exec("INSERT INTO "+tbl+" (key, value) VALUES ('resume_token_seed', ?) ON CONFLICT (key) DO NOTHING", hex.EncodeToString(fresh.Seed())).Error; err != nil {
		return nil, fmt.Errorf("store resume key: %w", err)
	}
	var stored []string
	if err := db.WithContext(ctx).Raw("SELECT value FROM " + tbl + " WHERE key = 'resume_token_seed'").Scan(&stored).Error; err != nil || len(stored) != 1 {
		return nil, fmt.Errorf("read resume key: %v", err)
	}
	return LoadResumeKey(ctx, db, stored[0])
}

// Issue makes a token for the presence presenceID of mesh meshID, bound to
// provenKey, the key its hello proved.
func (r *ResumeTokens) Issue(provenKey, meshID, presenceID string) string {
	now := r.now()
	claims, _ := json.Marshal(resumeClaims{Sub: provenKey, Mid: meshID, Prs: presenceID, Iat: now.UnixMilli(), Exp: now.Add(r.ttl).UnixMilli()})
	signed := resumePrefix + base64.RawURLEncoding.EncodeToString(claims)
	return signed + "." + base64.RawURLEncoding.EncodeToString(ed25519.Sign(r.key, []byte(signed)))
}

// Verify returns the claims of a genuine, unexpired token that names a
// proven key, a mesh and a presence.
func (r *ResumeTokens) Verify(token string) (resumeClaims, bool) {
	if !strings.HasPrefix(token, resumePrefix) || len(token) > 1024 {
		return resumeClaims{}, false
	}
	dot := strings.LastIndexByte(token, '.')
	if dot <= len(resumePrefix) {
		return resumeClaims{}, false
	}
	sig, err := base64.RawURLEncoding.DecodeString(token[dot+1:])
	if err != nil || len(sig) != ed25519.SignatureSize || !ed25519.Verify(r.key.Public().(ed25519.PublicKey), []byte(token[:dot]), sig) {
		return resumeClaims{}, false
	}
	raw, err := base64.RawURLEncoding.DecodeString(token[len(resumePrefix):dot])
	if err != nil {
		return resumeClaims{}, false
	}
	var c resumeClaims
	if json.Unmarshal(raw, &c) != nil || c.Sub == "" || c.Mid == "" || c.Prs == "" || r.now().UnixMilli() > c.Exp {
		return resumeClaims{}, false
	}
	return c, true
}
