package services

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// HandshakeError rejects a hello: the edge sends the error frame, then
// closes the socket with protocol.HandshakeClose(Code).
type HandshakeError struct {
	Code    protocol.Code
	Message string
	metric  string // broker_connections_rejected_total reason, when it differs from Code
}

func (e *HandshakeError) Error() string { return string(e.Code) + ": " + e.Message }

func reject(code protocol.Code, msg string) *HandshakeError {
	return &HandshakeError{Code: code, Message: msg}
}

// helloInput is what both hello kinds have in common once checked.
type helloInput struct {
	meshID        string
	member        *MemberRow
	memberPubkey  string
	sessionPubkey string
	hasSession    bool
	sessionID     string
	hasSID        bool
	displayName   string
	pid           int
	cwd           string
	groups        []protocol.Group
	groupsGiven   bool // hello.groups was an array
	hostname      string
	peerType      string
	channel       string
	model         string
	role          PeerRole
	resumed       bool  // authenticated by a resume token: reattach only
	lease         *Conn // resumed: the one presence the token is bound to
	// The member row came from the lease this hello reattaches to, not from
	// the database: the reattach is checked against the database after its
	// hello_ack (recheckMember), and a hello that ends up not reattaching
	// looks the member up before going on.
	leaseMember    bool
	parentMemberID string // session hello: the parentMemberId it claimed, "" if none
	// attestExpiresAt is the verified attestation's expiry (session hello).
	attestExpiresAt time.Time
}

// notFoundMessage is the unauthorized message of a hello of this role.
func notFoundMessage(role PeerRole) string {
	if role == RoleSession {
		return "parent pubkey not found in mesh"
	}
	return "pubkey not found in mesh"
}

func rawStr(r json.RawMessage) string {
	s, _ := protocol.RawString(r)
	return s
}

func rawInt(r json.RawMessage) int {
	f, ok := protocol.RawNumber(r)
	if !ok || f > math.MaxInt32 || f < math.MinInt32 {
		return 0
	}
	return int(f)
}

func (p *PresenceService) skewOK(r json.RawMessage, now time.Time) bool {
	ts, ok := protocol.RawNumber(r)
	if !ok {
		return false
	}
	return math.Abs(float64(now.UnixMilli())-ts) <= float64(p.cfg.HelloSkew.Milliseconds())
}

func (p *PresenceService) rejected(e *HandshakeError) *HandshakeError {
	reason := e.metric
	if reason == "" {
		reason = string(e.Code)
	}
	p.metrics.ConnectionsRejected.WithLabelValues(reason).Inc()
	return e
}

// maxHelloMeshID bounds a hello's meshId (ids are 32 characters). Any key
// can sign a hello naming any mesh, and the member lookup it leads to is
// cached under that id, refusal or not: a frame-sized id would let
// unauthenticated hellos pin a frame each in the cache.
const maxHelloMeshID = 128

// Hello authenticates a member hello (01 §2) and registers, reattaches or
// replaces the presence. On success hello_ack has been offered to out and
// the joins have been broadcast; the returned Conn is the socket's presence.
func (p *PresenceService) Hello(ctx context.Context, out Outbox, h *protocol.Hello) (*Conn, error) {
	started := p.now()
	if len(h.MeshID) > maxHelloMeshID {
		return nil, p.rejected(reject(protocol.CodeMalformed, "hello rejected: malformed"))
	}
	if c, err := p.tryResume(ctx, out, h.MeshID, h.Pubkey, RoleControlPlane, h.ResumeToken, h.DisplayName, h.Cwd, started); c != nil || err != nil {
		return c, err
	}
	sp, spPresent := h.SessionPubkey, len(h.SessionPubkey) > 0 && string(h.SessionPubkey) != "null"
	sessionPubkey, isStr := protocol.RawString(sp)
	if spPresent && (!isStr || sessionPubkey != "" && !protocol.IsLowerHex(sessionPubkey, 64)) {
		return nil, p.rejected(reject(protocol.CodeBadSessionPubkey, "sessionPubkey must be 64 lowercase hex chars"))
	}
	sid, hasSID := protocol.RawString(h.SessionID)
	in := helloInput{
		meshID: h.MeshID, memberPubkey: h.Pubkey, sessionPubkey: sessionPubkey, hasSession: spPresent,
		sessionID: sid, hasSID: hasSID && sid != "", displayName: rawStr(h.DisplayName), pid: rawInt(h.Pid), cwd: rawStr(h.Cwd),
		hostname: rawStr(h.Hostname), peerType: rawStr(h.PeerType), channel: rawStr(h.Channel), model: rawStr(h.Model),
		role: RoleControlPlane,
	}
	in.groups, in.groupsGiven = protocol.ParseGroups(h.Groups)
	if p.MeshCount(h.MeshID) >= p.cfg.MaxConnectionsPerMesh && !p.hasReattachCandidate(&in) {
		return nil, p.rejected(reject(protocol.CodeCapacity, "mesh at connection capacity"))
	}
	now := p.now()
	if !p.skewOK(h.Timestamp, now) {
		return nil, p.rejected(reject(protocol.CodeTimestampSkew, "hello rejected: timestamp_skew"))
	}
	if !protocol.IsHex(h.Pubkey, 64) || !protocol.IsHex(h.Signature, 128) {
		return nil, p.rejected(reject(protocol.CodeMalformed, "hello rejected: malformed"))
	}
	ts, _ := protocol.RawNumber(h.Timestamp)
	ok, err := protocol.Verify(h.Pubkey, protocol.HelloSigningString(h.MeshID, h.MemberID, h.Pubkey, ts), h.Signature)
	if err != nil {
		return nil, p.rejected(reject(protocol.CodeMalformed, "hello rejected: malformed"))
	}
	if !ok {
		return nil, p.rejected(reject(protocol.CodeBadSignature, "hello rejected: bad_signature"))
	}
	if err := p.bindClaimed(ctx, &in, h.MemberID); err != nil {
		return nil, err
	}
	member, err := p.authorizeHello(ctx, &in)
	if err != nil {
		return nil, err
	}
	in.member = member
	if !p.replays.firstUse(h.Pubkey, ts, h.Signature, now) {
		return nil, p.rejected(reject(protocol.CodeHelloReplayed, "hello rejected: hello_replayed"))
	}
	if err := p.checkLabel(ctx, &in); err != nil {
		return nil, err
	}
	return p.admit(ctx, out, &in, started)
}

// bindClaimed gives a member created by a v2 invite claim the key of its
// first signed hello (MemberDirectory.BindClaimedMember). Only a hello
// whose key is no member of the mesh tries, and never a reattach, so
// ordinary hellos cost nothing more than the (cached) lookup authorize
// makes anyway.
func (p *PresenceService) bindClaimed(ctx context.Context, in *helloInput, memberID string) error {
	if memberID == "" || p.hasReattachCandidate(in) {
		return nil
	}
	active, revoked, err := p.members.ByPubkey(ctx, in.meshID, in.memberPubkey)
	if err != nil || active != nil || revoked != nil {
		return err
	}
	name := in.displayName
	if name == "" {
		name = in.hostname
	}
	if _, err := p.members.BindClaimedMember(ctx, in.meshID, memberID, in.memberPubkey, name); err != nil {
		return err
	}
	return nil
}

// SessionHello authenticates a session hello (01 §3): a session key vouched
// for by its parent member's attestation.
func (p *PresenceService) SessionHello(ctx context.Context, out Outbox, h *protocol.SessionHello) (*Conn, error) {
	started := p.now()
	if len(h.MeshID) > maxHelloMeshID {
		return nil, p.rejected(&HandshakeError{Code: protocol.CodeMalformed, Message: "session_hello rejected: malformed", metric: "session_malformed"})
	}
	if c, err := p.tryResume(ctx, out, h.MeshID, rawStr(h.SessionPubkey), RoleSession, h.ResumeToken, h.DisplayName, h.Cwd, started); c != nil || err != nil {
		return c, err
	}
	sessionPubkey, _ := protocol.RawString(h.SessionPubkey)
	if !protocol.IsLowerHex(sessionPubkey, 64) {
		return nil, p.rejected(reject(protocol.CodeBadSessionPubkey, "sessionPubkey must be 64 lowercase hex chars"))
	}
	parent, _ := protocol.RawString(h.ParentMemberPubkey)
	if !protocol.IsLowerHex(parent, 64) {
		return nil, p.rejected(reject(protocol.CodeBadParentPubkey, "parentMemberPubkey must be 64 lowercase hex chars"))
	}
	var att protocol.Attestation
	attOK := len(h.ParentAttestation) > 0 && h.ParentAttestation[0] == '{' && json.Unmarshal(h.ParentAttestation, &att) == nil
	if !attOK || rawStr(att.SessionPubkey) != sessionPubkey || rawStr(att.ParentMemberPubkey) != parent {
		return nil, p.rejected(reject(protocol.CodeAttestationMismatch, "parentAttestation does not bind the claimed session+parent pubkeys"))
	}
	sid, hasSID := protocol.RawString(h.SessionID)
	in := helloInput{
		meshID: h.MeshID, memberPubkey: parent, sessionPubkey: sessionPubkey, hasSession: true,
		sessionID: sid, hasSID: hasSID && sid != "", displayName: rawStr(h.DisplayName), pid: rawInt(h.Pid), cwd: rawStr(h.Cwd),
		hostname: rawStr(h.Hostname), peerType: rawStr(h.PeerType), channel: rawStr(h.Channel), model: rawStr(h.Model),
		role: RoleSession,
	}
	in.groups, in.groupsGiven = protocol.ParseGroups(h.Groups)
	if p.MeshCount(h.MeshID) >= p.cfg.MaxConnectionsPerMesh && !p.hasReattachCandidate(&in) {
		return nil, p.rejected(reject(protocol.CodeCapacity, "mesh at connection capacity"))
	}
	now := p.now()
	attReject := func(code protocol.Code) *HandshakeError {
		return p.rejected(&HandshakeError{Code: code, Message: "attestation rejected: " + string(code), metric: "attestation_" + string(code)})
	}
	expires, ok := protocol.RawNumber(att.ExpiresAt)
	switch {
	case !ok:
		return nil, attReject(protocol.CodeMalformed)
	case expires <= float64(now.UnixMilli()):
		return nil, attReject(protocol.CodeExpired)
	case expires > float64(now.Add(p.cfg.MaxAttestTTL).UnixMilli()):
		return nil, attReject(protocol.CodeTTLTooLong)
	}
	attSig := rawStr(att.Signature)
	if !protocol.IsHex(attSig, 128) {
		return nil, attReject(protocol.CodeMalformed)
	}
	if ok, err := protocol.Verify(parent, protocol.SessionAttestString(parent, sessionPubkey, expires), attSig); err != nil || !ok {
		return nil, attReject(protocol.CodeBadSignature)
	}
	sesReject := func(code protocol.Code) *HandshakeError {
		return p.rejected(&HandshakeError{Code: code, Message: "session_hello rejected: " + string(code), metric: "session_" + string(code)})
	}
	if !p.skewOK(h.Timestamp, now) {
		return nil, sesReject(protocol.CodeTimestampSkew)
	}
	sig := rawStr(h.Signature)
	if !protocol.IsHex(sig, 128) {
		return nil, sesReject(protocol.CodeMalformed)
	}
	ts, _ := protocol.RawNumber(h.Timestamp)
	if ok, err := protocol.Verify(sessionPubkey, protocol.SessionHelloString(h.MeshID, parent, sessionPubkey, ts), sig); err != nil || !ok {
		return nil, sesReject(protocol.CodeBadSignature)
	}
	in.parentMemberID = rawStr(h.ParentMemberID)
	in.attestExpiresAt = time.UnixMilli(int64(expires))
	member, err := p.authorizeHello(ctx, &in)
	if err != nil {
		return nil, err
	}
	if err := p.checkParentID(&in, member); err != nil {
		return nil, err
	}
	if !p.replays.firstUse(sessionPubkey, ts, sig, now) {
		return nil, sesReject(protocol.CodeHelloReplayed)
	}
	in.member = member
	return p.admit(ctx, out, &in, started)
}

// tryResume reattaches with a resume token (H7) when it is genuine, names
// this mesh, and is bound to the key this hello claims and to a presence of
// that key and kind whose member is still active. Otherwise it returns
// nil, nil and the hello goes the normal way.
func (p *PresenceService) tryResume(ctx context.Context, out Outbox, meshID, claimedKey string, role PeerRole, token, displayName, cwd json.RawMessage, started time.Time) (*Conn, error) {
	tok, ok := protocol.RawString(token)
	if !ok || tok == "" || p.resume == nil {
		return nil, nil
	}
	lease := p.resumeLease(tok, meshID, claimedKey, role)
	if lease == nil {
		return nil, nil
	}
	member, err := p.members.ByID(ctx, lease.MemberID)
	if err != nil || member == nil || member.RevokedAt != nil {
		return nil, err
	}
	in := helloInput{
		meshID: meshID, member: member, memberPubkey: lease.MemberPubkey, sessionPubkey: lease.SessionPubkey, hasSession: lease.HasSession,
		displayName: rawStr(displayName), cwd: rawStr(cwd), role: lease.Role, resumed: true, lease: lease,
	}
	return p.admit(ctx, out, &in, started)
}

// authorizeHello authorizes a signed hello. A hello that will reattach to
// a lease is admitted on the member row that lease was admitted with, so a
// reconnect storm costs no member query before its hello_ack; recheckMember
// then confirms the member against the database and ends the presence if
// it was revoked meanwhile. Any other hello looks the member up first.
func (p *PresenceService) authorizeHello(ctx context.Context, in *helloInput) (*MemberRow, error) {
	p.mu.RLock()
	var m *MemberRow
	lease := p.findReattachLocked(in)
	if lease != nil {
		m = lease.member
	}
	p.mu.RUnlock()
	if m != nil {
		in.leaseMember = true
		return m, nil
	}
	member, err := p.authorize(ctx, in.meshID, in.memberPubkey, notFoundMessage(in.role))
	if lease != nil {
		p.endRefusedLease(lease, err)
	}
	return member, err
}

// endRefusedLease ends a lease restored without a member row (its member
// was revoked while no broker ran) once the member lookup of a hello that
// would reattach it refuses the member: announced once, as an expiry is.
func (p *PresenceService) endRefusedLease(c *Conn, err error) {
	var he *HandshakeError
	if !errors.As(err, &he) || he.Code != protocol.CodeRevoked && he.Code != protocol.CodeUnauthorized {
		return
	}
	p.log.Info("restored lease of a member no longer in the mesh", "presence_id", c.PresenceID, "mesh", c.MeshID, "code", he.Code)
	p.evict(c, EvictRevoked, true)
}

// checkParentID rejects a session hello whose parentMemberId names another
// member than its parent key does.
func (p *PresenceService) checkParentID(in *helloInput, member *MemberRow) error {
	if in.parentMemberID != "" && in.parentMemberID != member.ID {
		return p.rejected(reject(protocol.CodeParentMismatch, "parentMemberId does not match parentMemberPubkey"))
	}
	return nil
}

// recheckMember is the member check a reattach skipped (authorizeHello),
// run right after its hello_ack; out is the socket it reattached. A member
// revoked, deleted (or deleted and re-created under the same key) while
// the session was away gets what its hello would have got, the rejection
// frame and close, and the presence ends. A failing lookup closes the
// socket as a failing hello does (1011, retry) and leaves the lease to the
// next attempt. If another socket has taken the presence over meanwhile,
// that socket's own hello answers for it and nothing is done here.
func (p *PresenceService) recheckMember(c *Conn, out Outbox) {
	defer func() {
		if r := recover(); r != nil {
			p.log.Error("recheck member panic", "presence_id", c.PresenceID, "panic", r)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	notFound := notFoundMessage(c.Role)
	member, err := p.authorize(ctx, c.MeshID, c.MemberPubkey, notFound)
	if err == nil && member.ID != c.MemberID {
		err = p.rejected(reject(protocol.CodeUnauthorized, notFound))
	}
	var he *HandshakeError
	if err != nil && !errors.As(err, &he) {
		p.log.Warn("recheck member after reattach", "presence_id", c.PresenceID, "err", err)
		p.mu.RLock()
		current := c.out == out
		p.mu.RUnlock()
		if current {
			out.Offer(protocol.MustEncode(protocol.ErrorFrame{Type: "error", Code: protocol.CodeInternal, Message: "internal error"}))
			out.Close(protocol.Close{Code: 1011, Reason: "internal error", Retry: true})
		}
		return
	}
	p.mu.Lock()
	if c.out != out || p.conns[c.PresenceID] != c {
		p.mu.Unlock()
		return
	}
	if err == nil {
		c.member = member
		p.mu.Unlock()
		return
	}
	removed := p.removeLocked(c)
	p.mu.Unlock()
	p.log.Info("reattached member no longer in the mesh", "presence_id", c.PresenceID, "mesh", c.MeshID, "code", he.Code)
	out.Offer(protocol.MustEncode(protocol.ErrorFrame{Type: "error", Code: he.Code, Message: he.Message}))
	out.Close(protocol.HandshakeClose(he.Code))
	if removed {
		p.afterRemoval(c, EvictRevoked, true)
	}
}

// authorize is the two-step member lookup: active member, else revoked
// (4002), else unauthorized.
func (p *PresenceService) authorize(ctx context.Context, meshID, pubkey, notFound string) (*MemberRow, error) {
	active, revoked, err := p.members.ByPubkey(ctx, meshID, pubkey)
	if err != nil {
		return nil, err
	}
	if active != nil {
		return active, nil
	}
	if revoked != nil {
		label := meshID
		if m, err := p.members.Mesh(ctx, meshID); err == nil && m != nil {
			label = m.Label()
		}
		return nil, p.rejected(reject(protocol.CodeRevoked, fmt.Sprintf("You've been removed from %q. Contact the mesh owner to rejoin.", label)))
	}
	return nil, p.rejected(reject(protocol.CodeUnauthorized, notFound))
}

// matchesReattachLocked is the reattach rule (01 §6.1 with H3 and H6):
// session hellos match by session key (any lease state when allowOnline);
// member hellos by session key and member key, or, without a session key,
// by session id and member key. mu must be held.
func matchesReattachLocked(c *Conn, in *helloInput) bool {
	// Only a hello of the same kind proved the same key (handshake_proof.go).
	if c.MeshID != in.meshID || c.Role != in.role || c.MemberPubkey != in.memberPubkey {
		return false
	}
	if in.role == RoleSession {
		return c.SessionPubkey == in.sessionPubkey
	}
	if in.sessionPubkey != "" {
		return c.SessionPubkey == in.sessionPubkey
	}
	return c.SessionPubkey == "" && in.hasSID && c.hasSID && c.sessionID == in.sessionID
}

// findReattachLocked returns the first entry (insertion order) the hello
// may take over: an offline lease, or for a session hello also an online
// entry (H6); for a resume token, the presence it is bound to if it is
// still there. mu must be held.
func (p *PresenceService) findReattachLocked(in *helloInput) *Conn {
	if in.lease != nil {
		if p.conns[in.lease.PresenceID] == in.lease {
			return in.lease
		}
		return nil
	}
	var best *Conn
	for _, c := range p.byMesh[in.meshID] {
		if (!c.online || in.role == RoleSession || in.resumed) && matchesReattachLocked(c, in) && (best == nil || c.seq < best.seq) {
			best = c
		}
	}
	return best
}

func (p *PresenceService) hasReattachCandidate(in *helloInput) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.findReattachLocked(in) != nil
}

// admit runs the success path shared by both hello kinds (01 §2.4, §3.4).
func (p *PresenceService) admit(ctx context.Context, out Outbox, in *helloInput, started time.Time) (*Conn, error) {
	member := in.member
	mesh, err := p.members.Mesh(ctx, in.meshID)
	if err != nil {
		return nil, err
	}
	var policy *protocol.MeshPolicy
	if mesh != nil && len(mesh.SelfEditable) > 0 && string(mesh.SelfEditable) != "null" {
		policy = &protocol.MeshPolicy{SelfEditable: json.RawMessage(mesh.SelfEditable)}
	}
	effectiveName := in.displayName
	if effectiveName == "" {
		effectiveName = member.DisplayName
	}
	defaultGroups, _ := protocol.ParseGroups(json.RawMessage(member.DefaultGroups))
	if defaultGroups == nil {
		defaultGroups = []protocol.Group{}
	}
	profile := &protocol.MemberProfile{RoleTag: member.RoleTag, Groups: defaultGroups, MessageMode: "push"}
	if member.MessageMode != nil {
		profile.MessageMode = *member.MessageMode
	}

	var services *[]protocol.ServiceInfo
	if in.role == RoleControlPlane {
		services = p.servicesFor(ctx, in, member.ID)
	}

	// Reattach before dedup (01 §6.1).
	if c, err := p.reattach(ctx, out, in, effectiveName, policy, profile, services); c != nil || err != nil {
		if err == nil {
			p.metrics.ReattachLatency.Observe(p.now().Sub(started).Seconds())
			if in.leaseMember {
				p.bg.Go(func() { p.recheckMember(c, out) }) // waited for before storage closes
			}
		}
		return c, err
	}
	if in.leaseMember {
		// The lease went away meanwhile: this is a fresh hello after all,
		// and a fresh hello looks its member up.
		if in.member, err = p.authorize(ctx, in.meshID, in.memberPubkey, notFoundMessage(in.role)); err != nil {
			return nil, err
		}
		if err := p.checkParentID(in, in.member); err != nil {
			return nil, err
		}
		in.leaseMember = false
		if err := p.checkLabel(ctx, in); err != nil {
			return nil, err
		}
		return p.admit(ctx, out, in, started)
	}
	if in.resumed {
		// The lease went away between the token check and now: the token
		// proves nothing else, so the client must hello in full.
		return nil, p.rejected(reject(protocol.CodeExpired, "resume rejected: lease expired"))
	}

	// Only a fresh member hello restores peer_state; a reattach keeps the
	// lease's own state, so it does not pay for this read.
	var saved *peerStateRow
	if in.role == RoleControlPlane {
		if saved, err = p.restorePeerState(ctx, in.meshID, member.ID); err != nil {
			p.log.Warn("restore peer state", "mesh", in.meshID, "member", member.ID, "err", err)
			saved = nil
		}
	}

	// Initial groups (01 §2.4 step 3, §3.4).
	groups := in.groups
	restoredGroups := false
	if in.role == RoleControlPlane {
		if len(groups) == 0 {
			groups = nil
			if saved != nil && len(saved.groups) > 0 {
				groups, restoredGroups = saved.groups, true
			} else {
				groups = defaultGroups
			}
		}
	} else if !in.groupsGiven {
		groups = defaultGroups
	}
	if groups == nil {
		groups = []protocol.Group{}
	}

	// Session-id dedup, scoped to the member (H3).
	if in.hasSID {
		p.mu.RLock()
		var dups []*Conn
		for _, c := range p.byMesh[in.meshID] {
			if c.hasSID && c.sessionID == in.sessionID && c.MemberID == member.ID {
				dups = append(dups, c)
			}
		}
		p.mu.RUnlock()
		for _, c := range dups {
			if o := p.Outbox(c); o != nil {
				o.Close(protocol.CloseSessionReplaced)
			}
			p.evict(c, EvictDedup, false)
		}
	}

	now := p.now()
	c := &Conn{
		PresenceID: models.NewID(), MeshID: in.meshID, MemberID: member.ID, MemberPubkey: in.memberPubkey, member: member,
		SessionPubkey: in.sessionPubkey, HasSession: in.hasSession, Role: in.role, ConnectedAt: now,
		sessionID: in.sessionID, hasSID: in.hasSID, displayName: effectiveName, pid: in.pid, cwd: in.cwd,
		hostname: in.hostname, peerType: in.peerType, channel: in.channel, model: in.model,
		groups: groups, visible: true, profile: map[string]json.RawMessage{}, online: true, lastPongAt: now, out: out,
		attestExpiresAt: in.attestExpiresAt,
	}
	if saved != nil {
		if saved.visible != nil {
			c.visible = *saved.visible
		}
		if saved.profile != nil {
			c.profile = saved.profile
		}
	}
	if err := p.insertPresence(ctx, c, in); err != nil {
		return nil, err
	}
	p.status.Track(c.PresenceID, now)
	if err := p.status.ApplyPending(ctx, c.PresenceID, in.pid, in.cwd); err != nil {
		p.log.Warn("apply pending status", "presence_id", c.PresenceID, "err", err)
	}

	ack := protocol.HelloAck{
		Type: "hello_ack", PresenceID: c.PresenceID, MemberDisplayName: effectiveName, MemberProfile: profile,
		MeshPolicy: policy, Services: services, LeaseTTLMs: p.cfg.LeaseTTL.Milliseconds(), ResumeToken: p.resumeToken(c),
	}
	if saved != nil {
		ack.Restored = true
		ack.LastSummary = saved.lastSummary
		if saved.lastSeenAt != nil {
			ack.LastSeenAt = protocol.ISO(*saved.lastSeenAt)
		}
		if restoredGroups {
			ack.RestoredGroups = groups
		}
		if len(saved.stats) > 0 && string(saved.stats) != "null" {
			ack.RestoredStats = saved.stats
		}
	}
	ackFrame := protocol.MustEncode(ack)

	p.mu.Lock()
	var refuse *HandshakeError
	switch {
	case p.shutdown:
	case len(p.byMesh[in.meshID]) >= p.cfg.MaxConnectionsPerMesh:
		refuse = reject(protocol.CodeCapacity, "mesh at connection capacity")
	case in.label() != "" && p.labelHeldLocked(in.meshID, in.label(), member.ID):
		refuse = labelTaken() // another member registered it since checkLabel
	}
	if p.shutdown || refuse != nil || !out.Offer(ackFrame) {
		p.mu.Unlock()
		// The socket died during the hello, the mesh filled up meanwhile, or
		// the broker is stopping: leave nothing behind (H4).
		p.status.Forget(c.PresenceID)
		_ = p.markDisconnected(context.WithoutCancel(ctx), []string{c.PresenceID})
		if refuse != nil {
			return nil, p.rejected(refuse)
		}
		return nil, fmt.Errorf("socket closed during hello")
	}
	p.addLocked(c)
	// Proof wins over a label, whichever hello proved the key: a member
	// hello's key may have been another member's label since before it
	// joined.
	taken := p.takeLabelsLocked(in.meshID, provenKey(in.role, in.memberPubkey, in.sessionPubkey), member.ID)
	p.mu.Unlock()
	p.evictLabelHolders(taken)

	if in.role == RoleSession {
		p.audit.Record(in.meshID, "peer_joined", member.ID, effectiveName, map[string]any{
			"pubkey": in.memberPubkey, "session_pubkey": in.sessionPubkey, "groups": groupsPayload(groups), "via": "session_hello", "role": "session",
		})
	} else {
		p.audit.Record(in.meshID, "peer_joined", member.ID, effectiveName, map[string]any{
			"pubkey": in.memberPubkey, "groups": groupsPayload(groups), "restored": saved != nil, "role": "control-plane",
		})
	}
	p.announceJoin(c, effectiveName, groups, saved)
	p.log.Info("ws hello", "remote", remoteOf(out), "presence_id", c.PresenceID, "mesh", c.MeshID, "peer", protocol.Short(c.RoutingPubkey()),
		"kind", c.Role.Kind(), "restored", saved != nil)
	for _, fn := range p.onAttach {
		fn(c, true)
	}
	return c, nil
}

// resumeToken is the token hello_ack carries (H7), bound to the presence
// and the key its hello proved, never to a member hello's label.
func (p *PresenceService) resumeToken(c *Conn) string {
	if p.resume == nil {
		return ""
	}
	return p.resume.Issue(c.ProvenKey(), c.MeshID, c.PresenceID)
}

func groupsPayload(groups []protocol.Group) []any {
	out := make([]any, 0, len(groups))
	for _, g := range groups {
		m := map[string]any{"name": g.Name}
		if g.Role != "" {
			m["role"] = g.Role
		}
		out = append(out, m)
	}
	return out
}

// announceJoin sends peer_joined or peer_returned (01 §8) after the ack.
func (p *PresenceService) announceJoin(c *Conn, name string, groups []protocol.Group, saved *peerStateRow) {
	ev := protocol.PeerEvent{Name: name, Pubkey: c.RoutingPubkey(), Groups: &groups}
	event := "peer_joined"
	if saved != nil {
		event = "peer_returned"
		if saved.lastSeenAt != nil {
			ev.LastSeenAt = protocol.ISO(*saved.lastSeenAt)
		}
		ev.Summary = saved.lastSummary
	}
	f := protocol.MustEncode(protocol.NewSystemPush(c.MeshID, event, "low", ev, protocol.ISO(p.now())))
	p.Broadcast(c.MeshID, f, func(v PeerView) bool {
		if v.Conn == c {
			return false
		}
		// A session's join reaches its own member's other sockets; a member
		// hello's join does not.
		return c.Role == RoleSession || v.Conn.MemberPubkey != c.MemberPubkey
	})
}

// reattach swaps out into a matching lease (01 §6.1) or, for a session
// hello, takes over a live one (H6). It returns nil, nil when nothing
// matched.
func (p *PresenceService) reattach(ctx context.Context, out Outbox, in *helloInput, name string, policy *protocol.MeshPolicy, profile *protocol.MemberProfile, services *[]protocol.ServiceInfo) (*Conn, error) {
	p.mu.Lock()
	if p.shutdown {
		// The leases are being handed to the next process: a reattach now
		// would be lost with this one. The edge closes with a retryable code.
		p.mu.Unlock()
		return nil, errShuttingDown
	}
	c := p.findReattachLocked(in)
	if c == nil {
		p.mu.Unlock()
		return nil, nil
	}
	if in.displayName != "" {
		c.displayName = in.displayName
	}
	ack := protocol.HelloAck{Type: "hello_ack", PresenceID: c.PresenceID, MemberDisplayName: c.displayName, MeshPolicy: policy,
		LeaseTTLMs: p.cfg.LeaseTTL.Milliseconds(), ResumeToken: p.resumeToken(c)}
	if in.role == RoleControlPlane {
		ack.MemberProfile = profile
		ack.Services = services
	}
	if !out.Offer(protocol.MustEncode(ack)) {
		p.mu.Unlock()
		return nil, fmt.Errorf("socket closed during hello")
	}
	old := c.out
	wasOnline := c.online
	if c.leaseTimer != nil {
		c.leaseTimer.Stop()
		c.leaseTimer = nil
	}
	c.leaseGen++
	if !wasOnline {
		p.offline--
		p.metrics.OfflineLeases.Set(float64(p.offline))
	}
	c.out, c.online, c.leaseUntil, c.lastPongAt = out, true, time.Time{}, p.now()
	c.cwd = in.cwd
	if in.role == RoleSession && in.hasSID {
		c.sessionID, c.hasSID = in.sessionID, true // H6: the session id follows the newest socket, in memory only
	}
	if !in.attestExpiresAt.IsZero() {
		c.attestExpiresAt = in.attestExpiresAt
	}
	p.markDirtyLocked(c)
	p.mu.Unlock()

	if wasOnline && old != nil && old != out {
		old.Close(protocol.CloseSessionReplaced) // its close is ignored: c.out is no longer old
	}
	p.metrics.Reattaches.Inc()
	if err := p.db.WithContext(ctx).Exec("UPDATE "+p.db.Table("presence")+" SET disconnected_at = NULL, last_ping_at = ? WHERE id = ?", p.now().UTC(), c.PresenceID).Error; err != nil {
		p.log.Warn("restore presence", "presence_id", c.PresenceID, "err", err)
	}
	p.log.Info("ws reattach", "remote", remoteOf(out), "presence_id", c.PresenceID, "mesh", c.MeshID, "peer", protocol.Short(c.RoutingPubkey()),
		"kind", c.Role.Kind(), "takeover", wasOnline)
	for _, fn := range p.onAttach {
		fn(c, false)
	}
	return c, nil
}

func (p *PresenceService) insertPresence(ctx context.Context, c *Conn, in *helloInput) error {
	groups, _ := json.Marshal(c.groups)
	var sessionPubkey, displayName *string
	if in.hasSession {
		s := in.sessionPubkey
		sessionPubkey = &s
	}
	if in.displayName != "" {
		d := in.displayName
		displayName = &d
	}
	now := c.ConnectedAt.UTC()
	err := p.insertPresenceRows(ctx, "INSERT INTO "+p.db.Table("presence")+
		" (id, member_id, session_id, session_pubkey, display_name, pid, cwd, status, status_source, status_updated_at, groups, role, connected_at, last_ping_at)"+
		" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", []any{
		c.PresenceID, c.MemberID, in.sessionID, sessionPubkey, displayName, in.pid, in.cwd, StatusIdle, SourceJSONL, now,
		models.JSON(groups), string(c.Role), now, now}, c)
	if err != nil {
		return fmt.Errorf("insert presence: %w", err)
	}
	return nil
}

// servicesFor builds hello_ack.services from mesh.service (01 §4.1). A
// failing query omits the key, as the reference does.
func (p *PresenceService) servicesFor(ctx context.Context, in *helloInput, memberID string) *[]protocol.ServiceInfo {
	rows, err := p.members.RunningServices(ctx, in.meshID)
	if err != nil {
		p.log.Warn("list services for hello_ack", "mesh", in.meshID, "err", err)
		return nil
	}
	out := []protocol.ServiceInfo{}
	for _, r := range rows {
		if !serviceVisible(r.Scope, r.DeployedBy, memberID, in) {
			continue
		}
		s := protocol.ServiceInfo{Name: r.Name, Description: r.Description, Status: "stopped", Tools: json.RawMessage("[]"), DeployedBy: "unknown"}
		if r.Status != nil {
			s.Status = *r.Status
		}
		if len(r.ToolsSchema) > 0 && string(r.ToolsSchema) != "null" {
			s.Tools = json.RawMessage(r.ToolsSchema)
		}
		if r.DeployedByName != nil {
			s.DeployedBy = *r.DeployedByName
		}
		out = append(out, s)
	}
	return &out
}

// serviceVisible applies the scope rules of 01 §4.1 in their order.
func serviceVisible(scope models.JSON, deployedBy *string, memberID string, in *helloInput) bool {
	if len(scope) == 0 || string(scope) == "null" {
		return false
	}
	var asString string
	if json.Unmarshal(scope, &asString) == nil {
		return asString == "mesh" || asString == "peer" && deployedBy != nil && *deployedBy == memberID
	}
	var s struct {
		Type   string   `json:"type"`
		Peers  []string `json:"peers"`
		Group  string   `json:"group"`
		Groups []string `json:"groups"`
		Role   string   `json:"role"`
	}
	if json.Unmarshal(scope, &s) != nil {
		return false
	}
	if s.Type == "mesh" {
		return true
	}
	if s.Type == "peer" {
		return deployedBy != nil && *deployedBy == memberID
	}
	if s.Peers != nil {
		for _, peer := range s.Peers {
			if peer == in.displayName || peer == memberID {
				return true
			}
		}
		return false
	}
	for _, g := range in.groups {
		if s.Group != "" && g.Name == s.Group || s.Role != "" && g.Role == s.Role {
			return true
		}
		for _, name := range s.Groups {
			if name == g.Name {
				return true
			}
		}
	}
	return false
}
