package services

import (
	"context"
	"fmt"

	"github.com/claudemesh/meshbroker/protocol"
)

// Which key proved a presence, and what that key may claim (H3, H7, issue
// 13 item 1). A member hello proves its member key; its sessionPubkey is an
// unsigned routing label. A session hello proves its session key (vouched
// for by the parent's attestation). Every path that hands an existing
// presence to a new socket (reattach, takeover, resume token, and the
// restore of leases after a restart) requires the new hello to have proved
// the same key with the same kind of hello, and every path that lets a
// hello claim a key as its routing identity requires that key to be proven
// by it or to be a label no other member holds:
//
//   - matchesReattachLocked compares role, member key and session key;
//   - a resume token names the proven key and one presence, and is honoured
//     only for a hello claiming that key, and for a session only while the
//     attestation it last proved is unexpired (resumeLease);
//   - a member hello's label is refused when another member holds it in the
//     registry or ever held it in mesh.presence, or it is another member's
//     key (checkLabel, and labelHeldLocked again at registration);
//   - a hello that proves a key another member's socket uses as a label
//     ends that socket (takeLabelsLocked): proof wins over a label. For a
//     session hello that is its session key; for a member hello its member
//     key, which a label may have named before that member joined.
//
// Since a push's senderPubkey is the sender's session key or label, or its
// member key, it is always a key the sender proved or a label of its own
// member.
//
// Concurrency: the *Locked functions need PresenceService.mu; checkLabel
// runs without it and does I/O, and its answer is re-checked under mu when
// the presence is registered.

// EvictLabelTaken removes a member socket whose label another hello proved.
const EvictLabelTaken EvictReason = "label_taken"

func labelTaken() *HandshakeError {
	return reject(protocol.CodeSessionPubkeyTaken, "sessionPubkey belongs to another member")
}

// provenKey is the key a hello of role proved.
func provenKey(role PeerRole, memberPubkey, sessionPubkey string) string {
	if role == RoleSession {
		return sessionPubkey
	}
	return memberPubkey
}

// ProvenKey is the key this presence's hello proved: what its resume
// tokens are bound to and what a reattach must prove again.
func (c *Conn) ProvenKey() string { return provenKey(c.Role, c.MemberPubkey, c.SessionPubkey) }

// label is the member hello's routing label, "" when it has none (or it is
// its own member key, which it proved).
func (in *helloInput) label() string {
	if in.role != RoleControlPlane || in.sessionPubkey == in.memberPubkey {
		return ""
	}
	return in.sessionPubkey
}

// labelHeldLocked reports whether an entry of another member than memberID
// has key as its member key, session key or label in mesh. mu must be held.
func (p *PresenceService) labelHeldLocked(meshID, key, memberID string) bool {
	for _, c := range p.byKey[keyOf(meshID, key)] {
		if c.MemberID != memberID {
			return true
		}
	}
	return false
}

// checkLabel refuses a member hello whose label belongs to another member:
// held in the registry, another member's key, or used by another member's
// presence before (a session that has ended keeps its key). A hello that
// reattaches to its own lease carrying that label was checked when the
// lease was admitted, and costs no query here.
func (p *PresenceService) checkLabel(ctx context.Context, in *helloInput) error {
	label := in.label()
	if label == "" || in.leaseMember {
		return nil
	}
	p.mu.RLock()
	held := p.labelHeldLocked(in.meshID, label, in.member.ID)
	p.mu.RUnlock()
	if held {
		return p.rejected(labelTaken())
	}
	active, revoked, err := p.members.ByPubkey(ctx, in.meshID, label)
	if err != nil {
		return err
	}
	if active != nil && active.ID != in.member.ID || active == nil && revoked != nil && revoked.ID != in.member.ID {
		return p.rejected(labelTaken())
	}
	var used []string
	err = p.db.WithContext(ctx).Raw("SELECT p.member_id FROM "+p.db.Table("presence")+" p JOIN "+p.db.Table("member")+" m ON m.id = p.member_id"+
		" WHERE p.session_pubkey = ? AND p.member_id <> ? AND m.mesh_id = ? LIMIT 1", label, in.member.ID, in.meshID).Scan(&used).Error
	if err != nil {
		return fmt.Errorf("check session label %s: %w", shortKey(label), err)
	}
	if len(used) > 0 {
		return p.rejected(labelTaken())
	}
	return nil
}

// takenLabel is a member socket whose label another member's hello proved.
type takenLabel struct {
	c   *Conn
	out Outbox // nil while it was offline
}

// takeLabelsLocked removes from the registry the member sockets of other
// members that use key, just proven by a hello of memberID, as
// their label, and returns them; the caller ends them after unlocking
// (evictLabelHolders). mu must be held.
func (p *PresenceService) takeLabelsLocked(meshID, key, memberID string) []takenLabel {
	var taken []takenLabel
	for _, c := range append([]*Conn(nil), p.byKey[keyOf(meshID, key)]...) {
		if c.MemberID == memberID || c.Role != RoleControlPlane || c.SessionPubkey != key {
			continue
		}
		t := takenLabel{c: c}
		if c.online {
			t.out = c.out
		}
		if p.removeLocked(c) {
			taken = append(taken, t)
		}
	}
	return taken
}

// evictLabelHolders ends what takeLabelsLocked removed: the rejection a
// hello of theirs would get now, the close, and the usual removal cleanup
// (no peer_left, as for the other moderation-like removals).
func (p *PresenceService) evictLabelHolders(taken []takenLabel) {
	he := labelTaken()
	for _, t := range taken {
		if t.out != nil {
			t.out.Offer(protocol.MustEncode(protocol.ErrorFrame{Type: "error", Code: he.Code, Message: he.Message}))
			t.out.Close(protocol.HandshakeClose(he.Code))
		}
		p.log.Info("label taken by a proven session key", "presence_id", t.c.PresenceID, "mesh", t.c.MeshID, "peer", protocol.Short(t.c.SessionPubkey))
		p.afterRemoval(t.c, EvictLabelTaken, false)
	}
}

// resumeLease returns the presence a resume token resumes for a hello of
// role claiming claimedKey in meshID, or nil when the token is not genuine
// or not bound to that key, or the session's attestation has expired: then
// the hello is judged on its own, as a fresh hello.
func (p *PresenceService) resumeLease(token, meshID, claimedKey string, role PeerRole) *Conn {
	claims, ok := p.resume.Verify(token)
	if !ok || claims.Mid != meshID || claims.Sub != claimedKey {
		p.log.Info("resume token refused", "mesh", meshID)
		return nil
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	lease := p.conns[claims.Prs]
	if lease == nil || lease.MeshID != meshID || lease.Role != role || lease.ProvenKey() != claimedKey {
		return nil
	}
	// A token stands in for the session's attestation, never for longer
	// than the attestation itself: once the parent's grant has run out the
	// session must prove a fresh one.
	if !lease.attestExpiresAt.IsZero() && !p.now().Before(lease.attestExpiresAt) {
		p.log.Info("resume token refused: the session's attestation has expired", "mesh", meshID, "presence_id", lease.PresenceID)
		return nil
	}
	return lease
}
