package client

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"errors"

	"filippo.io/edwards25519"
	"golang.org/x/crypto/nacl/box"
)

// Envelopes are crypto_box (X25519 + XSalsa20-Poly1305), as libsodium's
// crypto_box_easy, with both ends' ed25519 identity keys converted to
// X25519 the way crypto_sign_ed25519_{pk,sk}_to_curve25519 do. The broker
// never opens them; the client does, so tests and the load tool send real
// ciphertext.

// EdPublicToX25519 converts an ed25519 public key to the X25519 public key
// of the same secret, u = (1 + y) / (1 - y), and refuses exactly what
// libsodium's crypto_sign_ed25519_pk_to_curve25519 refuses: 32 bytes that
// are not a point on the curve, a point of small order (whose X25519 key
// would make every shared secret predictable), and a point outside the
// prime-order subgroup.
func EdPublicToX25519(pub ed25519.PublicKey) ([32]byte, error) {
	var out [32]byte
	if len(pub) != ed25519.PublicKeySize {
		return out, errors.New("ed25519 public key must be 32 bytes")
	}
	p, err := new(edwards25519.Point).SetBytes(pub)
	if err != nil {
		return out, errors.New("ed25519 public key is not a point on the curve")
	}
	identity := edwards25519.NewIdentityPoint()
	if new(edwards25519.Point).MultByCofactor(p).Equal(identity) == 1 {
		return out, errors.New("ed25519 public key is a point of small order")
	}
	if new(edwards25519.Point).Add(new(edwards25519.Point).ScalarMult(orderMinusOne, p), p).Equal(identity) != 1 {
		return out, errors.New("ed25519 public key is not in the prime-order subgroup")
	}
	copy(out[:], p.BytesMontgomery())
	return out, nil
}

// orderMinusOne is l - 1, the largest scalar: [l-1]P + P is [l]P, the
// identity exactly when P is in the prime-order subgroup.
var orderMinusOne = func() *edwards25519.Scalar {
	le := [32]byte{ // l - 1 = 2^252 + 27742317777372353535851937790883648492, little-endian
		0xec, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
		0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,
	}
	s, err := new(edwards25519.Scalar).SetCanonicalBytes(le[:])
	if err != nil {
		panic("l - 1 is a canonical scalar: " + err.Error())
	}
	return s
}()

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
