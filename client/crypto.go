package client

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"errors"
	"math/big"

	"golang.org/x/crypto/nacl/box"
)

// Envelopes are crypto_box (X25519 + XSalsa20-Poly1305), as libsodium's
// crypto_box_easy, with both ends' ed25519 identity keys converted to
// X25519 the way crypto_sign_ed25519_{pk,sk}_to_curve25519 do. The broker
// never opens them; the client does, so tests and the load tool send real
// ciphertext.

// curve25519Prime is 2^255 - 19.
var curve25519Prime, _ = new(big.Int).SetString("7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffed", 16)

// EdPublicToX25519 converts an ed25519 public key to its Montgomery form:
// u = (1 + y) / (1 - y) mod p.
func EdPublicToX25519(pub ed25519.PublicKey) ([32]byte, error) {
	var out [32]byte
	if len(pub) != ed25519.PublicKeySize {
		return out, errors.New("ed25519 public key must be 32 bytes")
	}
	le := make([]byte, 32)
	copy(le, pub)
	le[31] &= 0x7f // drop the sign bit of x
	y := new(big.Int).SetBytes(reverse(le))
	one := big.NewInt(1)
	num := new(big.Int).Add(one, y)
	den := new(big.Int).Sub(one, y)
	den.Mod(den, curve25519Prime)
	if den.Sign() == 0 {
		return out, errors.New("ed25519 public key has no X25519 form")
	}
	den.ModInverse(den, curve25519Prime)
	u := num.Mul(num, den)
	u.Mod(u, curve25519Prime)
	b := u.FillBytes(make([]byte, 32))
	copy(out[:], reverse(b))
	return out, nil
}

// EdPrivateToX25519 converts an ed25519 secret key to an X25519 scalar.
func EdPrivateToX25519(priv ed25519.PrivateKey) [32]byte {
	h := sha512.Sum512(priv.Seed())
	var out [32]byte
	copy(out[:], h[:32])
	out[0] &= 248
	out[31] &= 127
	out[31] |= 64
	return out
}

func reverse(b []byte) []byte {
	out := make([]byte, len(b))
	for i := range b {
		out[len(b)-1-i] = b[i]
	}
	return out
}

// Seal encrypts plaintext from sender to recipient and returns the base64
// nonce and ciphertext a `send` frame carries.
func Seal(plaintext []byte, recipient ed25519.PublicKey, sender ed25519.PrivateKey) (nonceB64, ciphertextB64 string, err error) {
	peer, err := EdPublicToX25519(recipient)
	if err != nil {
		return "", "", err
	}
	mine := EdPrivateToX25519(sender)
	var nonce [24]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return "", "", err
	}
	sealed := box.Seal(nil, plaintext, &nonce, &peer, &mine)
	return base64.StdEncoding.EncodeToString(nonce[:]), base64.StdEncoding.EncodeToString(sealed), nil
}

// Open decrypts an envelope from sender.
func Open(nonceB64, ciphertextB64 string, sender ed25519.PublicKey, recipient ed25519.PrivateKey) ([]byte, error) {
	nonceBytes, err := base64.StdEncoding.DecodeString(nonceB64)
	if err != nil || len(nonceBytes) != 24 {
		return nil, errors.New("nonce must be 24 bytes of base64")
	}
	ct, err := base64.StdEncoding.DecodeString(ciphertextB64)
	if err != nil {
		return nil, errors.New("ciphertext is not base64")
	}
	peer, err := EdPublicToX25519(sender)
	if err != nil {
		return nil, err
	}
	mine := EdPrivateToX25519(recipient)
	var nonce [24]byte
	copy(nonce[:], nonceBytes)
	out, ok := box.Open(nil, ct, &nonce, &peer, &mine)
	if !ok {
		return nil, errors.New("envelope does not open with these keys")
	}
	return out, nil
}
