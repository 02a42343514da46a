package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"golang.org/x/crypto/nacl/box"

	"github.com/claudemesh/meshbroker/services"
)

// BenchmarkE2EInviteClaim measures v2 claims over HTTP on one invite with
// enough uses: each is a transaction with the mesh row lock, the spend,
// the member and #general inserts, and a sealed box.
//
//	go test . -run '^$' -bench InviteClaim -benchmem
func BenchmarkE2EInviteClaim(b *testing.B) {
	br := benchStartBroker(b)
	ctx := context.Background()
	owner, err := services.NewProvisionService(br.db, time.Now).CreateMesh(ctx, "bench", "", "owner")
	if err != nil {
		b.Fatal(err)
	}
	inv, err := services.NewInviteService(br.db, time.Now, nil).Create(ctx, owner.MeshID, services.InviteOptions{MaxUses: 100_000, BrokerURL: "ws://localhost/ws"})
	if err != nil {
		b.Fatal(err)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/invites/%s/claim", br.Port(), inv.Code)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			pub, _, _ := box.GenerateKey(rand.Reader)
			body, _ := json.Marshal(map[string]string{"recipient_x25519_pubkey": base64.RawURLEncoding.EncodeToString(pub[:])})
			resp, err := http.Post(url, "application/json", bytes.NewReader(body))
			if err != nil {
				b.Error(err)
				return
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("claim: %d", resp.StatusCode)
				return
			}
		}
	})
}
