package main

import (
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/internal/clienttest"
)

// A resume token stands in for a session's parent attestation only while
// that attestation is valid: a session whose grant has run out cannot keep
// resuming its lease with the token alone; it must prove a fresh
// attestation, and then it reattaches as usual.
func TestResumeTokenEndsWithTheAttestation(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(time.Hour))
	f := b.fixture()
	sess := client.NewSession()
	sess.ExpiresAt = b.clock.now().Add(time.Hour)
	s := b.connect(f.a, client.Options{Session: &sess})
	token := s.HelloAck.ResumeToken
	s.Kill()
	b.waitOffline(s.HelloAck.PresenceID)
	bare := clienttest.Mutate(client.Options{Session: &sess}, func(m map[string]any) {
		for _, k := range []string{"signature", "parentAttestation", "timestamp"} {
			delete(m, k)
		}
		m["resumeToken"] = token
	})

	// Within the attestation the token alone resumes the lease.
	again, err := b.tryConnect(f.a, bare)
	if err != nil || again.HelloAck.PresenceID != s.HelloAck.PresenceID {
		t.Fatalf("resume inside the attestation: %v %+v", err, again)
	}
	token = again.HelloAck.ResumeToken
	again.Kill()
	b.waitOffline(s.HelloAck.PresenceID)

	// Past it, the token is ignored and the bare hello fails on its own.
	b.advance(2 * time.Hour)
	bare = clienttest.Mutate(client.Options{Session: &sess}, func(m map[string]any) {
		for _, k := range []string{"signature", "parentAttestation", "timestamp"} {
			delete(m, k)
		}
		m["resumeToken"] = token
	})
	rejected(t, b, f.a, bare, "attestation_mismatch", 1008, "parentAttestation")

	// A fresh attestation reattaches the same lease.
	sess.ExpiresAt = b.clock.now().Add(time.Hour)
	renewed := b.connect(f.a, client.Options{Session: &sess, Now: b.clock.now})
	if renewed.HelloAck.PresenceID != s.HelloAck.PresenceID {
		t.Fatalf("renewed attestation got presence %s, want %s", renewed.HelloAck.PresenceID, s.HelloAck.PresenceID)
	}
}
