package main

import (
	"errors"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/internal/clienttest"
)

// Issue 13 item 1, H3 and H7: a member hello's sessionPubkey is an unsigned
// label. Claiming another member's session key as that label must neither
// be admitted nor yield a resume token that takes the victim's lease.
func TestMemberHelloCannotResumeAnotherMembersSession(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(30*time.Second))
	f := b.fixture()
	carol := b.connect(f.c, client.Options{})
	sess := client.NewSession()
	victim := b.connect(f.a, client.Options{Session: &sess})
	waitFrame(t, carol, 10*time.Second, isEvent("peer_joined"))

	attacker, err := b.tryConnect(f.b, client.Options{SessionPubkey: sess.Pubkey()})
	if err == nil {
		tok := attacker.HelloAck.ResumeToken
		again, err := b.tryConnect(f.b, client.Options{SessionPubkey: sess.Pubkey(), ResumeToken: tok})
		if err == nil && again.HelloAck.PresenceID == victim.HelloAck.PresenceID {
			t.Fatalf("bob resumed alice's session %s with the token of his labelled hello", victim.HelloAck.PresenceID)
		}
		t.Fatalf("a member hello labelled with another member's session key was admitted (%s)", attacker.AckRaw)
	}
	var he *client.HandshakeError
	if !errors.As(err, &he) || he.Code != "session_pubkey_taken" || he.Close == nil || he.Close.Code != 1008 || he.Close.Text != "session_pubkey_taken" {
		t.Fatalf("labelled hello: %v (close %+v), want session_pubkey_taken and 1008", err, he)
	}
	// The same holds while the victim is in grace: the lease is not up for grabs.
	victim.Kill()
	b.waitOffline(victim.HelloAck.PresenceID)
	rejected(t, b, f.b, client.Options{SessionPubkey: sess.Pubkey()}, "session_pubkey_taken", 1008, "sessionPubkey")
	// Another member's key is no label either.
	rejected(t, b, f.b, client.Options{SessionPubkey: f.c.Pubkey()}, "session_pubkey_taken", 1008, "sessionPubkey")

	// Legitimate use is unchanged: a member hello with its own label
	// reattaches silently with a fresh signature (the CLI's ws-client),
	// and the victim's own session comes back.
	label := client.NewSession().Pubkey()
	cli := b.connect(f.b, client.Options{SessionPubkey: label})
	cli.Kill()
	b.waitOffline(cli.HelloAck.PresenceID)
	if back := b.connect(f.b, client.Options{SessionPubkey: label}); back.HelloAck.PresenceID != cli.HelloAck.PresenceID {
		t.Fatalf("own-label reattach: %s, want presence %s", back.AckRaw, cli.HelloAck.PresenceID)
	}
	b.connect(f.a, client.Options{Session: &sess})
}

// H7: a resume token is bound to the key its hello proved and to its
// presence. Presented by any other key it is ignored: the hello is judged
// on its own signature, as a fresh hello.
func TestResumeTokenBoundToProvenKey(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(30*time.Second))
	f := b.fixture()
	sess := client.NewSession()
	s := b.connect(f.a, client.Options{Session: &sess})
	sessTok := s.HelloAck.ResumeToken

	// Bob, with his own valid hello, presents alice's session token.
	bob := b.connect(f.b, client.Options{ResumeToken: sessTok})
	if bob.HelloAck.PresenceID == s.HelloAck.PresenceID {
		t.Fatal("bob's hello with alice's session token took her session over")
	}
	// Alice's member key did not prove the session's lease either.
	am := b.connect(f.a, client.Options{ResumeToken: sessTok})
	if am.HelloAck.PresenceID == s.HelloAck.PresenceID {
		t.Fatal("alice's member hello resumed her session's lease")
	}
	// Nor did another session key of alice.
	sess2 := client.NewSession()
	s2 := b.connect(f.a, client.Options{Session: &sess2, ResumeToken: sessTok})
	if s2.HelloAck.PresenceID == s.HelloAck.PresenceID {
		t.Fatal("another session key resumed the session")
	}
	if s.CloseError() != nil {
		t.Fatalf("the session was closed: %v", s.CloseError())
	}
	if _, err := s.ListPeers(ctxT(t)); err != nil {
		t.Fatalf("the session lost its socket: %v", err)
	}

	// A member hello's token is bound to the member key, not to its label.
	memberTok := am.HelloAck.ResumeToken
	if !strings.HasPrefix(memberTok, "mesh-resume.v1.") {
		t.Fatalf("member hello got no token: %s", am.AckRaw)
	}
	if x := b.connect(f.b, client.Options{ResumeToken: memberTok}); x.HelloAck.PresenceID == am.HelloAck.PresenceID {
		t.Fatal("bob resumed alice's member socket with her token")
	}
	unsigned := func(tok string) func(map[string]any) {
		return func(m map[string]any) {
			for _, k := range []string{"signature", "parentAttestation", "timestamp"} {
				delete(m, k)
			}
			m["resumeToken"] = tok
		}
	}
	// Without a signature a token is all a hello has, and alice's token on
	// bob's key is none: his unsigned hello is judged on its own and refused.
	rejected(t, b, f.b, clienttest.Mutate(client.Options{}, unsigned(memberTok)), "timestamp_skew", 1008, "hello rejected")

	// The keys that proved the leases resume them.
	am.Kill()
	b.waitOffline(am.HelloAck.PresenceID)
	back := b.connect(f.a, clienttest.Mutate(client.Options{}, unsigned(memberTok)))
	if back.HelloAck.PresenceID != am.HelloAck.PresenceID {
		t.Fatalf("member resume: %s, want %s", back.AckRaw, am.HelloAck.PresenceID)
	}
	again := b.connect(f.a, clienttest.Mutate(client.Options{Session: &sess}, unsigned(sessTok)))
	if again.HelloAck.PresenceID != s.HelloAck.PresenceID {
		t.Fatalf("session resume: %s, want %s", again.AckRaw, s.HelloAck.PresenceID)
	}
}

// Issue 13 item 1: a push's senderPubkey is a key its sender proved or a
// label of the sender's own member, never another member's session key.
func TestPushSenderCannotBeAnotherMembersSessionKey(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(200*time.Millisecond))
	f := b.fixture()
	carol := b.connect(f.c, client.Options{})
	sess := client.NewSession()
	alice := b.connect(f.a, client.Options{Session: &sess})

	// Whatever the broker answers to bob's labelled hello, nothing he sends
	// may reach carol as alice's session.
	if bob, err := b.tryConnect(f.b, client.Options{SessionPubkey: sess.Pubkey()}); err == nil {
		if _, err := bob.SendSealed(ctxT(t), f.c.Pubkey(), pub(f.c.Key), "now", []byte("from alice, honest")); err != nil {
			t.Fatal(err)
		}
		p := decodePush(t, waitFrame(t, carol, 10*time.Second, isMessage))
		if p.SenderPubkey == sess.Pubkey() {
			t.Fatal("bob's push reached carol with alice's session key as senderPubkey")
		}
	}
	// Nor once alice's session has ended: the key stays her member's.
	alice.Kill()
	waitFor(t, 10*time.Second, "alice's session evicted", func() bool { return b.presence.Get(alice.HelloAck.PresenceID) == nil })
	rejected(t, b, f.b, client.Options{SessionPubkey: sess.Pubkey()}, "session_pubkey_taken", 1008, "sessionPubkey")

	// Bob's pushes carry his own key.
	bob := b.connect(f.b, client.Options{})
	if _, err := bob.SendSealed(ctxT(t), f.c.Pubkey(), pub(f.c.Key), "now", []byte("hi")); err != nil {
		t.Fatal(err)
	}
	if p := decodePush(t, waitFrame(t, carol, 10*time.Second, isMessage)); p.SenderPubkey != f.b.Pubkey() {
		t.Fatalf("push senderPubkey %s, want bob's key", p.SenderPubkey)
	}
}

// A member hello holding a label it had first is closed when the key's
// holder proves it with a session hello: proof wins over a label.
func TestSessionHelloEvictsForeignLabel(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t, withLease(5*time.Second))
	f := b.fixture()
	sess := client.NewSession()
	squatter := b.connect(f.b, client.Options{SessionPubkey: sess.Pubkey()})
	owner := b.connect(f.a, client.Options{Session: &sess})
	select {
	case <-squatter.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the squatting member socket was not closed")
	}
	if ce := squatter.CloseError(); ce == nil || ce.Code != 1008 || ce.Text != "session_pubkey_taken" {
		t.Fatalf("squatter close %+v, want 1008 session_pubkey_taken", ce)
	}
	waitFor(t, 10*time.Second, "squatter's presence ended", func() bool { return b.presence.Get(squatter.HelloAck.PresenceID) == nil })
	if _, err := owner.ListPeers(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}

// H10, issue 13 item 7: the same signed hello replayed on a second socket
// inside the skew window is refused and leaves the first socket alone.
func TestReplayedHelloRefused(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	sess := client.NewSession()
	for _, tc := range []struct {
		name   string
		opts   client.Options
		prefix string
	}{
		{"member", client.Options{SessionPubkey: client.NewSession().Pubkey()}, "hello rejected: hello_replayed"},
		{"session", client.Options{Session: &sess}, "session_hello rejected: hello_replayed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var captured map[string]any
			opts := clienttest.Mutate(tc.opts, func(m map[string]any) { captured = maps.Clone(m) })
			orig := b.connect(f.a, opts)
			replay := clienttest.Mutate(tc.opts, func(m map[string]any) { clear(m); maps.Copy(m, captured) })
			rejected(t, b, f.a, replay, "hello_replayed", 1008, tc.prefix)
			if ce := orig.CloseError(); ce != nil {
				t.Fatalf("the original socket was closed: %v", ce)
			}
			if _, err := orig.ListPeers(ctxT(t)); err != nil {
				t.Fatalf("the original socket lost its presence: %v", err)
			}
			// A fresh signature from the same key is of course fine.
			if again := b.connect(f.a, tc.opts); again.HelloAck.PresenceID == "" {
				t.Fatal("fresh hello refused")
			}
		})
	}
}
