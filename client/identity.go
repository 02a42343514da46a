package client

import (
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"fmt"
)

// identityFile is one entry of the JSON `meshbroker demo` and `meshbroker
// mesh create` print: ids, names and a 64-byte ed25519 secret key in hex
// (seed || public key, as libsodium stores it).
type identityFile struct {
	MeshID      string `json:"meshId"`
	MemberID    string `json:"memberId"`
	DisplayName string `json:"displayName"`
	Pubkey      string `json:"pubkey"`
	SecretKey   string `json:"secretKey"`
}

// ParseIdentities reads one identity object or an array of them.
func ParseIdentities(raw []byte) ([]Identity, error) {
	var list []identityFile
	if err := json.Unmarshal(raw, &list); err != nil {
		var one identityFile
		if err2 := json.Unmarshal(raw, &one); err2 != nil {
			return nil, fmt.Errorf("identities: %w", err)
		}
		list = []identityFile{one}
	}
	out := make([]Identity, 0, len(list))
	for i, f := range list {
		key, err := hex.DecodeString(f.SecretKey)
		if err != nil || len(key) != ed25519.PrivateKeySize {
			return nil, fmt.Errorf("identity %d: secretKey must be 128 hex characters", i)
		}
		id := Identity{MeshID: f.MeshID, MemberID: f.MemberID, DisplayName: f.DisplayName, Key: ed25519.PrivateKey(key)}
		if f.Pubkey != "" && f.Pubkey != id.Pubkey() {
			return nil, fmt.Errorf("identity %d: pubkey does not match secretKey", i)
		}
		out = append(out, id)
	}
	return out, nil
}
