package client

import (
	"bytes"
	"crypto/ed25519"
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
