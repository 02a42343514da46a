// Package services holds the broker's behaviour: everything between a decoded
// frame and a row in the database.
//
// Each service owns its state and its tables, and says at the top of its file
// who may touch which field and under which lock:
//
//   - PresenceService (presence.go, presence_ops.go, peerstate.go): the
//     connection registry, offline leases, reattach, eviction and the
//     peer-state saves that mirror it into mesh.presence.
//   - Handshake (handshake.go, resume.go): hello and session_hello
//     verification, attestation, resume tokens.
//   - MessagingService and QueueService (messaging.go, queue.go): routing,
//     the group-committed message_queue, drains, push confirmation and
//     client_ack.
//   - StatusService (status.go): Claude Code status, the hook route's
//     pending status and the sweepers.
//   - AuditService (audit.go, jcs.go): the metadata-only, hash-chained audit
//     log and its canonical JSON.
//   - Realtime (realtime*.go): URL watches, streams, the MCP registry, the
//     mesh clock and shared state, all cleaned up on eviction.
//   - MemberDirectory, ProvisionService, topics: lookups and provisioning.
//
// Services depend on models (storage) and protocol (wire shapes), never on
// handlers. A service that needs another takes it in its constructor,
// usually through a small interface declared where it is used.
package services
