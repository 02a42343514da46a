package client_test

// These examples need a running broker, so they are compiled but not run
// (no Output comments): package client cannot start one without importing
// the module root. goclient_test.go at the root runs the same flows
// against a real broker. The examples that need none, and whose output go
// test checks, are in example_offline_test.go.

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/protocol"
)

// A session connects, sends a DM to a member and prints what comes back.
func Example() {
	ctx := context.Background()
	raw, err := os.ReadFile("demo-identities.json") // written by `meshbroker demo`
	if err != nil {
		log.Fatal(err)
	}
	ids, err := client.ParseIdentities(raw)
	if err != nil {
		log.Fatal(err)
	}
	alice, bob := ids[0], ids[1]

	sess := client.NewSession()
	c, err := client.Connect(ctx, "ws://127.0.0.1:7900/ws", alice, client.Options{Session: &sess, DisplayName: "alice"})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	// Addressed to bob's member key: exactly one of bob's connections gets it.
	bobKey := bob.Key.Public().(ed25519.PublicKey)
	if _, err := c.SendDirect(ctx, bobKey, client.PriorityNow, []byte("ping")); err != nil {
		log.Fatal(err)
	}
	m, err := c.Receive(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s from %x\n", m.Plaintext, m.Sender)
}

// Receive returns opened messages; replying to m.Sender reaches exactly the
// connection that wrote (its session key when it is a session).
func ExampleClient_Receive() {
	ctx := context.Background()
	var c *client.Client // connected as in the package example
	for {
		m, err := c.Receive(ctx)
		if errors.Is(err, client.ErrUnreadable) {
			log.Printf("skipping message %s: %v", m.ID, err)
			continue
		}
		if err != nil {
			log.Fatal(err) // the Client has ended: see c.Err()
		}
		if m.Direct {
			reply := append([]byte("re: "), m.Plaintext...)
			if _, err := c.SendDirect(ctx, m.Sender, client.PriorityNext, reply); err != nil {
				log.Print(err)
			}
		} else {
			fmt.Printf("[%s] %s: %s\n", m.Topic, m.SenderName, m.Plaintext)
		}
	}
}

// A refused send is a *client.SendError with the broker's reason.
func ExampleSendError() {
	ctx := context.Background()
	var c *client.Client
	_, err := c.Send(ctx, client.SendRequest{TargetSpec: "*", Priority: client.PriorityLow, Nonce: "", Ciphertext: ""})
	var se *client.SendError
	switch {
	case errors.As(err, &se) && se.Code == client.SendRateLimited:
		time.Sleep(time.Second) // the bucket refills at one message per second by default
	case errors.As(err, &se):
		log.Printf("refused (%s): %s", se.Code, se.Message)
	case errors.Is(err, client.ErrConnectionLost):
		log.Print("unknown outcome; retry with the same ClientMessageID")
	}
}

// With Reconnect, a dropped socket is redialled and the lease resumed with
// the same session key and the latest resume token.
func ExampleReconnectPolicy() {
	ctx := context.Background()
	var alice client.Identity // from client.ParseIdentities
	sess := client.NewSession()
	c, err := client.Connect(ctx, "ws://127.0.0.1:7900/ws", alice, client.Options{
		Session: &sess,
		Reconnect: &client.ReconnectPolicy{
			MinDelay: 250 * time.Millisecond,
			MaxDelay: 10 * time.Second,
			OnReconnect: func(ack protocol.HelloAck) {
				log.Printf("back as presence %s", ack.PresenceID)
			},
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	<-c.Done() // closed only when the client gives up: kicked, revoked, Close
	log.Printf("ended: %v", c.Err())
}
