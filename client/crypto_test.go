package client

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"math/big"
	"slices"
	"strings"
	"testing"

	"golang.org/x/crypto/curve25519"
)

// The two conversions agree: the X25519 public key derived from the
// converted secret equals the converted ed25519 public key, as libsodium's
// crypto_sign_ed25519_{sk,pk}_to_curve25519 pair guarantees.
func TestEdToX25519Consistent(t *testing.T) {
	for range 50 {
		pub, priv, _ := ed25519.GenerateKey(nil)
		sk := EdPrivateToX25519(priv)
		want, err := curve25519.X25519(sk[:], curve25519.Basepoint)
		if err != nil {
			t.Fatal(err)
		}
		got, err := EdPublicToX25519(pub)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[:], want) {
			t.Fatalf("pk conversion %x, want %x", got, want)
		}
	}
}

func TestSealOpen(t *testing.T) {
	apub, apriv, _ := ed25519.GenerateKey(nil)
	bpub, bpriv, _ := ed25519.GenerateKey(nil)
	n, c, err := Seal([]byte("hello"), bpub, apriv)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := Open(n, c, apub, bpriv); err != nil || string(got) != "hello" {
		t.Fatalf("%q %v", got, err)
	}
	if _, err := Open(n, c, bpub, bpriv); err == nil {
		t.Fatal("opened with the wrong sender key")
	}
}

// oldEdPublicToX25519 is the hand-written math/big conversion this package
// used before filippo.io/edwards25519, kept here to show the new one gives
// the same bytes for every valid key.
func oldEdPublicToX25519(pub ed25519.PublicKey) []byte {
	p, _ := new(big.Int).SetString("7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffed", 16)
	le := bytes.Clone(pub)
	le[31] &= 0x7f
	slices.Reverse(le)
	y := new(big.Int).SetBytes(le)
	num := new(big.Int).Add(big.NewInt(1), y)
	den := new(big.Int).Sub(big.NewInt(1), y)
	den.Mod(den, p).ModInverse(den, p)
	u := num.Mul(num, den).Mod(num, p).FillBytes(make([]byte, 32))
	slices.Reverse(u)
	return u
}

// Known answers of libsodium 1.0.18 (crypto_sign_seed_keypair, then
// crypto_sign_ed25519_{pk,sk}_to_curve25519), the first being libsodium's
// own ed25519_convert test; and the old conversion on random keys.
func TestX25519MatchesLibsodium(t *testing.T) {
	for _, v := range []struct{ seed, edPub, xPub, xPriv string }{
		{"421151a459faeade3d247115f94aedae42318124095afabe4d1451a559faedee", "b5076a8474a832daee4dd5b4040983b6623b5f344aca57d4d6ee4baf3f259e6e",
			"f1814f0e8ff1043d8a44d25babff3cedcae6c22c3edaa48f857ae70de2baae50", "8052030376d47112be7f73ed7a019293dd12ad910b654455798b4667d73de166"},
		{"0000000000000000000000000000000000000000000000000000000000000000", "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
			"5bf55c73b82ebe22be80f3430667af570fae2556a6415e6b30d4065300aa947d", "5046adc1dba838867b2bbbfdd0c3423e58b57970b5267a90f57960924a87f156"},
		{"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", "76a1592044a6e4f511265bca73a604d90b0529d1df602be30a19a9257660d1f5",
			"d1fa3f01826bd8b78e057c086c7b22c7ad4358ca918099cd7b7e5d3acd7e285b", "20cd6935864716a79d74dd5fabbd8964304051ca41a31c4659158ebb7c3d0b57"},
		{"8133ec487699284cd209c1d7edd267407723d0807c05ce3a9658b4b36c86e1cd", "f352883fcea7dd50e01f0d6d005b2856fd161ee729aa0f8592ce2e4be4de7aad",
			"9edd3fc0ed10eae92156a8f084e998d257f8f168388c56114c344b70e8e5cc55", "70e5590e3b7d0e2c34ec98222fb22cce25bde5409d5ffe0e88f1bee3c0e8fd5c"},
	} {
		seed, _ := hex.DecodeString(v.seed)
		priv := ed25519.NewKeyFromSeed(seed)
		pub := priv.Public().(ed25519.PublicKey)
		if hex.EncodeToString(pub) != v.edPub {
			t.Fatalf("seed %s: ed25519 key %x", v.seed, pub)
		}
		xPub, err := EdPublicToX25519(pub)
		if err != nil || hex.EncodeToString(xPub[:]) != v.xPub {
			t.Errorf("seed %s: X25519 public %x %v, want %s", v.seed, xPub, err, v.xPub)
		}
		if xPriv := EdPrivateToX25519(priv); hex.EncodeToString(xPriv[:]) != v.xPriv {
			t.Errorf("seed %s: X25519 secret %x, want %s", v.seed, xPriv, v.xPriv)
		}
	}
	for range 200 {
		pub, _, _ := ed25519.GenerateKey(nil)
		got, err := EdPublicToX25519(pub)
		if want := oldEdPublicToX25519(pub); err != nil || !bytes.Equal(got[:], want) {
			t.Fatalf("key %x: %x %v, the old conversion gave %x", pub, got, err, want)
		}
	}
}

// Issue 13 item 8: 32 bytes that are not a usable ed25519 public key are
// refused, as libsodium refuses them (each of these returns -1 there), where
// the old conversion computed a key from any bytes.
func TestX25519RejectsInvalidPoint(t *testing.T) {
	for _, tt := range []struct{ hex, why string }{
		{"0100000000000000000000000000000000000000000000000000000000000000", "small order"}, // the identity
		{"0000000000000000000000000000000000000000000000000000000000000000", "small order"}, // order 4
		{"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", "small order"}, // order 2
		{"c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa", "small order"}, // order 8
		{"26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05", "small order"}, // order 8
		{"0200000000000000000000000000000000000000000000000000000000000000", "not a point"},
		{mixedOrderPoint, "prime-order subgroup"}, // a valid key plus an order-8 point
	} {
		b, _ := hex.DecodeString(tt.hex)
		if _, err := EdPublicToX25519(b); err == nil || !strings.Contains(err.Error(), tt.why) {
			t.Errorf("%s: %v, want an error about %s", tt.hex, err, tt.why)
		}
		if _, _, err := Seal([]byte("x"), b, ed25519.NewKeyFromSeed(make([]byte, 32))); err == nil {
			t.Errorf("%s: Seal accepted it", tt.hex)
		}
	}
}

// mixedOrderPoint is the ed25519 key of seed 00..00 plus the order-8 point
// c7176a70...03fa: on the curve, not in the prime-order subgroup
// (libsodium's crypto_sign_ed25519_pk_to_curve25519 returns -1 for it).
const mixedOrderPoint = "e76fc4015d5e223a791875e76aec0b853951d81b187fc5e3d046b36b4e70c6a7"
