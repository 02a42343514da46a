package client_test

// Runnable examples of the parts that need no broker: go test checks their
// output.

import (
	"crypto/ed25519"
	"encoding/hex"
	"fmt"
	"log"

	"github.com/claudemesh/meshbroker/client"
)

// An envelope sealed to a recipient's ed25519 key opens only with that
// recipient's key and the sender's public key; the broker routes it without
// being able to read it.
func ExampleSeal() {
	alice := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	bobSeed := make([]byte, ed25519.SeedSize)
	bobSeed[0] = 1
	bob := ed25519.NewKeyFromSeed(bobSeed)

	nonce, ciphertext, err := client.Seal([]byte("hello bob"), bob.Public().(ed25519.PublicKey), alice)
	if err != nil {
		log.Fatal(err)
	}
	plain, err := client.Open(nonce, ciphertext, alice.Public().(ed25519.PublicKey), bob)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(plain))

	// Anyone else, the broker included, cannot open it.
	_, err = client.Open(nonce, ciphertext, alice.Public().(ed25519.PublicKey), alice)
	fmt.Println(err != nil)
	// Output:
	// hello bob
	// true
}

// ParseIdentities reads what `meshbroker mesh create`, `member add` and
// `demo` print; the public key is derived from the secret key and checked
// against the pubkey field when there is one.
func ExampleParseIdentities() {
	key := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	raw := fmt.Sprintf(`{"meshId":"m1","memberId":"u1","displayName":"alice","secretKey":%q}`, hex.EncodeToString(key))
	ids, err := client.ParseIdentities([]byte(raw))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ids[0].DisplayName, ids[0].MeshID, ids[0].Pubkey())

	_, err = client.ParseIdentities([]byte(`{"secretKey":"00"}`))
	fmt.Println(err)
	// Output:
	// alice m1 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29
	// identity 0: secretKey must be 128 hex characters
}

// Priorities are typed; the broker refuses anything else.
func ExamplePriority() {
	for _, p := range []client.Priority{client.PriorityNow, client.PriorityNext, client.PriorityLow, "urgent"} {
		fmt.Println(p, p.Valid())
	}
	// Output:
	// now true
	// next true
	// low true
	// urgent false
}
