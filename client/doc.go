// Package client is a Go client for a claudemesh broker (meshbroker or the
// reference): it connects with a signed member hello or session_hello,
// sends and receives end-to-end encrypted messages, answers requests by
// _reqId, and can reconnect and resume its lease. The broker only routes;
// envelopes are crypto_box (Seal, Open) between ed25519 keys converted to
// X25519, as libsodium does, so the CLI and the TypeScript SDK read what
// this package writes and the other way round. The wire contract is in
// docs/protocol at the root of this module (01 for hellos and leases, 02
// for messaging).
//
// # Connecting
//
// An Identity is a member of one mesh (ParseIdentities reads the JSON that
// `meshbroker mesh create` and `meshbroker demo` print). Connect with a
// zero Options sends a member hello; with Options.Session it sends a
// session_hello for that ephemeral key, vouched for by the member key.
// Peers then know the connection by its session key, and a DM to that key
// reaches this connection only.
//
// # Addressing: SendRequest.TargetSpec
//
// The broker compares targets exactly: keys are 64 lowercase hex
// characters, never normalised.
//
//   - A member's public key (hex): a direct message to the member. It is
//     one stored message, and exactly one of that member's connections
//     gets it: whichever of its sessions or its member (daemon) socket
//     first may take it, the sender's own connection excluded. Whether a
//     connection may take it depends on its status and the priority (see
//     below), per connection, so a "next" DM can reach an idle daemon while
//     the member's sessions are working. A DM to your own member key needs
//     another connection of yours. Seal it to the member key.
//   - A session's public key (hex): a direct message to the one connection
//     holding that session key (online, or within its lease grace, in
//     which case it waits and is pushed when the session reattaches). Seal
//     it to the session key. A push's senderPubkey is such a key when the
//     sender is a session, so replying to Message.Sender reaches exactly
//     the connection that wrote.
//   - A display name (meshbroker only): matched case-insensitively against
//     the live, visible connections of the mesh other than the sender's,
//     the earliest connected first, and rewritten to that connection's key
//     (its session key, else its member key) before the message is stored.
//     A name two members share is refused. The envelope must still be
//     sealed to the key the name stands for; ListPeers gives names and keys.
//   - "*" or "@all": a broadcast, pushed live to every visible connection
//     of every other member (none of the sender member's own connections).
//     A connection that is offline at that moment misses it.
//   - "@<group>": as a broadcast, to connections whose groups (hello
//     groups, join_group) include exactly that name, case-sensitively.
//   - "#<topicId>": a topic post (the topic's id, not its name), pushed
//     live to the connections of the topic's members other than the
//     sender member's; an unknown id is refused with SendNotFound.
//
// Anything else is treated as a direct target that matches nobody and is
// refused with SendNoRecipient. Multicast bodies ("*", "@...", "#...") are
// not encrypted: the CLI's convention, which SendMulticast follows, is
// base64 of the plaintext.
//
// # Priorities
//
// Priority is "now", "next" or "low" (PriorityNow, PriorityNext,
// PriorityLow); an empty Priority leaves the field out and the broker stores
// "next". A recipient connection whose status is idle takes all three; one
// that is working or dnd takes only "now", and the others wait, in order,
// until it is idle again. Multicast is never held back.
//
// # Sending
//
// Send waits for the broker's ack: ack.Queued means the message is stored
// (meshbroker acks only after the commit), not yet delivered. A refused
// send returns its ack and a *SendError whose Code (SendRateLimited,
// SendNoRecipient, SendBlocked, ...) says why; errors.As finds it. A socket
// lost before the ack returns ErrConnectionLost: the message may or may
// not be stored, and a retry with the same SendRequest.ClientMessageID is
// safe on meshbroker (it returns the first ack).
//
// # Receiving
//
// Receive returns the next message: a DM opened with the key it was sealed
// to (the push does not say whether that was the session key or the member
// key, so both are tried, session key first), or a multicast with its body
// decoded, with the sender's key decoded from hex. Unless Options.ManualAck
// is set it sends client_ack for each DM before returning it. A connection
// that has acked is given an unacknowledged DM again after a reconnect
// (at-least-once); Receive drops such repeats. Next and Events give the raw
// frames, system pushes (peer_joined, peer_left, ...) included; they share
// one stream with Receive, so a program uses one or the other.
//
// # Reconnecting
//
// With Options.Reconnect set, a lost socket is redialled with jittered
// exponential backoff, and each attempt sends a freshly signed hello of the
// same identity (same session key, same sessionId) with the resumeToken
// of the latest hello_ack. Within the broker's lease grace (90 s by
// default) this resumes the same presence: peers see no peer_left and no
// peer_joined, and DMs sent meanwhile are pushed after the new hello_ack.
// Events and Receive carry on across the gap; requests waiting at the
// moment of the loss fail with ErrConnectionLost, and writes until the new
// socket is up return ErrNotConnected. A kick (4001), a revocation (4002),
// a policy rejection (1008), the lease being taken over by another socket
// of the same session (1000 session_replaced) or a hello the broker
// refuses for good end the Client instead; Done is closed and Err says
// why. meshbroker gives every hello_ack a token bound to the key the
// hello proved, and a token takes the lease over even while the broker
// still believes the old socket is alive, so member connections (no
// Session) resume like session ones. Without a token (other brokers), a
// member connection gets its lease back only once the broker has seen the
// old socket close; until then the broker replaces it with a new presence.
//
// # Concurrency
//
// A Client is safe for concurrent use. It runs one goroutine, which reads
// the current socket and redials; callbacks in ReconnectPolicy run on it
// and must return quickly.
//
// # Low level
//
// Dial and BuildHello let a program speak the protocol over its own socket;
// WriteJSON, WriteRaw and Request send arbitrary frames. Tests in this
// module use internal/clienttest for hello edits and a client that ignores
// pings; those knobs are not part of Options.
package client
