package protocol

import (
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"strings"
)

// Canonical signing strings (01 §2.2, §3.2). Numbers use the JavaScript
// String(number) form; the clients sign exactly these bytes.

// HelloSigningString is what a member signs for `hello`.
func HelloSigningString(meshID, memberID, pubkey string, timestamp float64) string {
	return meshID + "|" + memberID + "|" + pubkey + "|" + FormatJSNumber(timestamp)
}

// SessionAttestString is what a parent member signs to vouch for a session key.
func SessionAttestString(parentMemberPubkey, sessionPubkey string, expiresAt float64) string {
	return "claudemesh-session-attest|" + parentMemberPubkey + "|" + sessionPubkey + "|" + FormatJSNumber(expiresAt)
}

// SessionHelloString is what a session key signs for `session_hello`.
func SessionHelloString(meshID, parentMemberPubkey, sessionPubkey string, timestamp float64) string {
	return "claudemesh-session-hello|" + meshID + "|" + parentMemberPubkey + "|" + sessionPubkey + "|" + FormatJSNumber(timestamp)
}

// ErrUndecodable is returned by Verify when the key or signature is not
// valid hex of the right length: the reference's "verification throws".
var ErrUndecodable = errors.New("undecodable key or signature")

// Verify checks a detached ed25519 signature given as hex (either case)
// over message, with a public key given as hex.
func Verify(pubkeyHex, message, signatureHex string) (bool, error) {
	pub, err := hex.DecodeString(pubkeyHex)
	if err != nil || len(pub) != ed25519.PublicKeySize {
		return false, ErrUndecodable
	}
	sig, err := hex.DecodeString(signatureHex)
	if err != nil || len(sig) != ed25519.SignatureSize {
		return false, ErrUndecodable
	}
	return ed25519.Verify(ed25519.PublicKey(pub), []byte(message), sig), nil
}

// Sign returns the lowercase hex detached signature of message, as
// libsodium's to_hex(crypto_sign_detached(...)) would.
func Sign(key ed25519.PrivateKey, message string) string {
	return hex.EncodeToString(ed25519.Sign(key, []byte(message)))
}

// PubkeyHex is the lowercase hex of key's public half.
func PubkeyHex(key ed25519.PrivateKey) string {
	return hex.EncodeToString(key.Public().(ed25519.PublicKey))
}

// Short is the first 8 characters of a key or id, for logs.
func Short(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 8 {
		return s[:8]
	}
	return s
}
