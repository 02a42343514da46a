package models

import (
	"fmt"
	"regexp"
	"strings"
)

// SchemaVersion is the row Bootstrap records in meshbroker_schema. It names
// the reference migration the tables correspond to (0029, at 9d1b4f3). Change
// it only together with the DDL below.
const SchemaVersion = "0001_meshbroker_ref0029"

// tableDDL creates one table and its indexes. Statements use IF NOT EXISTS so
// that running them again is harmless; Bootstrap still skips objects that
// exist, so a second run issues no DDL at all on Postgres.
type tableDDL struct {
	name    string   // unqualified table name
	create  string   // CREATE TABLE IF NOT EXISTS ...
	indexes []string // CREATE [UNIQUE] INDEX IF NOT EXISTS <name> ...
}

var indexNameRE = regexp.MustCompile(`(?i)^CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+) `)

// indexName extracts the index name from one of the statements below.
func indexName(stmt string) (string, error) {
	m := indexNameRE.FindStringSubmatch(stmt)
	if m == nil {
		return "", fmt.Errorf("schema: cannot find index name in %q", stmt)
	}
	return m[1], nil
}

// Postgres DDL. Column order, types, defaults and constraint names follow the
// reference migrations: tables from drizzle-generated migrations carry their
// named foreign keys (<table>_<col>_<ref>_<refcol>_fk), tables from hand-written
// migrations use inline REFERENCES (named by Postgres). The differences from a
// migrated database are listed on each table. Enums are created separately.

const pgMesh = `CREATE TABLE IF NOT EXISTS mesh.mesh (
	id text PRIMARY KEY NOT NULL,
	name text NOT NULL,
	slug text NOT NULL,
	owner_user_id text NOT NULL,
	visibility mesh.visibility DEFAULT 'private' NOT NULL,
	transport mesh.transport DEFAULT 'managed' NOT NULL,
	max_peers integer,
	tier mesh.tier DEFAULT 'free' NOT NULL,
	created_at timestamp DEFAULT now() NOT NULL,
	archived_at timestamp,
	owner_pubkey text,
	owner_secret_key text,
	root_key text,
	self_editable jsonb DEFAULT '{"displayName":true,"roleTag":true,"groups":true,"messageMode":true}'::jsonb
)`

// Not created here: mesh_owner_user_id_user_id_fk → public."user" (the web
// app's table). mesh_slug_unique was dropped by migration 0017.

const pgMember = `CREATE TABLE IF NOT EXISTS mesh.member (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	user_id text,
	peer_pubkey text NOT NULL,
	display_name text NOT NULL,
	role mesh.role DEFAULT 'member' NOT NULL,
	joined_at timestamp DEFAULT now() NOT NULL,
	last_seen_at timestamp,
	revoked_at timestamp,
	role_tag text,
	default_groups jsonb DEFAULT '[]'::jsonb,
	message_mode text DEFAULT 'push',
	dashboard_user_id text,
	peer_grants jsonb DEFAULT '{}'::jsonb NOT NULL,
	CONSTRAINT member_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE
)`

// Not created here: member_user_id_user_id_fk → public."user" ON DELETE SET NULL.

const pgPresence = `CREATE TABLE IF NOT EXISTS mesh.presence (
	id text PRIMARY KEY NOT NULL,
	member_id text NOT NULL,
	session_id text NOT NULL,
	pid integer NOT NULL,
	cwd text NOT NULL,
	status mesh.presence_status DEFAULT 'idle' NOT NULL,
	status_source mesh.presence_status_source DEFAULT 'jsonl' NOT NULL,
	status_updated_at timestamp DEFAULT now() NOT NULL,
	connected_at timestamp DEFAULT now() NOT NULL,
	last_ping_at timestamp DEFAULT now() NOT NULL,
	disconnected_at timestamp,
	summary text,
	display_name text,
	session_pubkey text,
	"groups" jsonb DEFAULT '[]'::jsonb,
	role text DEFAULT 'session' NOT NULL,
	CONSTRAINT presence_member_id_member_id_fk FOREIGN KEY (member_id) REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE
)`

const pgPendingStatus = `CREATE TABLE IF NOT EXISTS mesh.pending_status (
	id text PRIMARY KEY NOT NULL,
	pid integer NOT NULL,
	cwd text NOT NULL,
	status text NOT NULL,
	status_source text NOT NULL,
	created_at timestamp DEFAULT now() NOT NULL,
	applied_at timestamp
)`

const pgMessageQueue = `CREATE TABLE IF NOT EXISTS mesh.message_queue (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	sender_member_id text NOT NULL,
	target_spec text NOT NULL,
	priority mesh.message_priority DEFAULT 'next' NOT NULL,
	nonce text NOT NULL,
	ciphertext text NOT NULL,
	created_at timestamp DEFAULT now() NOT NULL,
	delivered_at timestamp,
	expires_at timestamp,
	sender_session_pubkey text,
	client_message_id text,
	request_fingerprint text,
	claimed_at timestamp,
	claim_id text,
	claim_expires_at timestamp,
	CONSTRAINT message_queue_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	CONSTRAINT message_queue_sender_member_id_member_id_fk FOREIGN KEY (sender_member_id) REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE
)`

// The shape of migration 0021, which replaced 0000's audit_log outright.
const pgAuditLog = `CREATE TABLE IF NOT EXISTS mesh.audit_log (
	id integer PRIMARY KEY GENERATED ALWAYS AS IDENTITY NOT NULL,
	mesh_id text NOT NULL,
	event_type text NOT NULL,
	actor_member_id text,
	actor_display_name text,
	payload jsonb NOT NULL DEFAULT '{}'::jsonb,
	prev_hash text NOT NULL,
	hash text NOT NULL,
	created_at timestamp NOT NULL DEFAULT now(),
	CONSTRAINT audit_log_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE
)`

// Migration 0014 makes (mesh_id, member_id) a unique constraint, where mesh.ts
// declares a unique index of the same name.
const pgPeerState = `CREATE TABLE IF NOT EXISTS mesh.peer_state (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	"groups" jsonb DEFAULT '[]',
	profile jsonb DEFAULT '{}',
	visible boolean NOT NULL DEFAULT true,
	last_summary text,
	last_display_name text,
	cumulative_stats jsonb DEFAULT '{"messagesIn":0,"messagesOut":0,"toolCalls":0,"errors":0}',
	last_seen_at timestamp,
	created_at timestamp NOT NULL DEFAULT now(),
	updated_at timestamp NOT NULL DEFAULT now(),
	CONSTRAINT peer_state_mesh_member_idx UNIQUE (mesh_id, member_id)
)`

const pgState = `CREATE TABLE IF NOT EXISTS mesh.state (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	"key" text NOT NULL,
	value jsonb NOT NULL,
	updated_by_presence text,
	updated_by_name text,
	updated_at timestamp DEFAULT now() NOT NULL,
	CONSTRAINT state_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE
)`

const pgStream = `CREATE TABLE IF NOT EXISTS mesh.stream (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	name text NOT NULL,
	created_by_name text,
	created_at timestamp DEFAULT now() NOT NULL,
	CONSTRAINT stream_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE
)`

// mesh.file (migrations 0009, 0012) has no model: files are out of scope. It
// exists so that service.source_file_id can reference it as in the reference.
const pgFile = `CREATE TABLE IF NOT EXISTS mesh.file (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	name text NOT NULL,
	size_bytes integer NOT NULL,
	mime_type text,
	minio_key text NOT NULL,
	tags text[] DEFAULT '{}',
	persistent boolean DEFAULT true NOT NULL,
	uploaded_by_name text,
	uploaded_by_member text,
	target_spec text,
	uploaded_at timestamp DEFAULT now() NOT NULL,
	expires_at timestamp,
	deleted_at timestamp,
	encrypted boolean DEFAULT false NOT NULL,
	owner_pubkey text,
	CONSTRAINT file_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	CONSTRAINT file_uploaded_by_member_member_id_fk FOREIGN KEY (uploaded_by_member) REFERENCES mesh.member(id) ON DELETE NO ACTION ON UPDATE NO ACTION
)`

// mesh.service comes from mesh.ts alone (no reference migration creates it);
// constraint names are the ones drizzle would generate.
const pgService = `CREATE TABLE IF NOT EXISTS mesh.service (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	name text NOT NULL,
	type text NOT NULL,
	source_type text NOT NULL,
	source_file_id text,
	source_git_url text,
	source_git_branch text DEFAULT 'main',
	source_git_sha text,
	prev_git_sha text,
	description text NOT NULL,
	instructions text,
	tools_schema jsonb,
	manifest jsonb,
	runtime text,
	status text DEFAULT 'stopped',
	config jsonb DEFAULT '{}'::jsonb,
	last_health timestamp,
	restart_count integer DEFAULT 0,
	version integer DEFAULT 1,
	scope jsonb DEFAULT '{"type":"peer"}'::jsonb,
	deployed_by text,
	deployed_by_name text,
	created_at timestamp DEFAULT now() NOT NULL,
	updated_at timestamp DEFAULT now() NOT NULL,
	CONSTRAINT service_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	CONSTRAINT service_source_file_id_file_id_fk FOREIGN KEY (source_file_id) REFERENCES mesh.file(id) ON DELETE NO ACTION ON UPDATE NO ACTION,
	CONSTRAINT service_deployed_by_member_id_fk FOREIGN KEY (deployed_by) REFERENCES mesh.member(id) ON DELETE NO ACTION ON UPDATE NO ACTION
)`

const pgTopic = `CREATE TABLE IF NOT EXISTS mesh.topic (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	name text NOT NULL,
	description text,
	visibility mesh.topic_visibility NOT NULL DEFAULT 'public',
	created_by_member_id text REFERENCES mesh.member(id) ON DELETE SET NULL ON UPDATE CASCADE,
	created_at timestamp DEFAULT now() NOT NULL,
	archived_at timestamp,
	encrypted_key_pubkey text
)`

const pgTopicMember = `CREATE TABLE IF NOT EXISTS mesh.topic_member (
	topic_id text NOT NULL REFERENCES mesh.topic(id) ON DELETE CASCADE ON UPDATE CASCADE,
	member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	role mesh.topic_member_role NOT NULL DEFAULT 'member',
	joined_at timestamp DEFAULT now() NOT NULL,
	last_read_at timestamp
)`

const pgTopicMessage = `CREATE TABLE IF NOT EXISTS mesh.topic_message (
	id text PRIMARY KEY NOT NULL,
	topic_id text NOT NULL REFERENCES mesh.topic(id) ON DELETE CASCADE ON UPDATE CASCADE,
	sender_member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	sender_session_pubkey text,
	nonce text NOT NULL,
	ciphertext text NOT NULL,
	created_at timestamp DEFAULT now() NOT NULL,
	body_version integer NOT NULL DEFAULT 1,
	reply_to_id text REFERENCES mesh.topic_message(id) ON DELETE SET NULL ON UPDATE CASCADE
)`

const pgNotification = `CREATE TABLE IF NOT EXISTS mesh.notification (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	topic_id text NOT NULL REFERENCES mesh.topic(id) ON DELETE CASCADE ON UPDATE CASCADE,
	message_id text NOT NULL REFERENCES mesh.topic_message(id) ON DELETE CASCADE ON UPDATE CASCADE,
	recipient_member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	sender_member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	kind text NOT NULL DEFAULT 'mention',
	created_at timestamp DEFAULT now() NOT NULL,
	read_at timestamp
)`

const pgTopicMemberKey = `CREATE TABLE IF NOT EXISTS mesh.topic_member_key (
	id text PRIMARY KEY NOT NULL,
	topic_id text NOT NULL REFERENCES mesh.topic(id) ON DELETE CASCADE ON UPDATE CASCADE,
	member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	encrypted_key text NOT NULL,
	nonce text NOT NULL,
	created_at timestamp DEFAULT now() NOT NULL,
	rotated_at timestamp
)`

// meshbroker_schema is ours: one row per schema version Bootstrap applied.
const pgMeshbrokerSchema = `CREATE TABLE IF NOT EXISTS mesh.meshbroker_schema (
	version text PRIMARY KEY NOT NULL,
	applied_at timestamp DEFAULT now() NOT NULL
)`

// meshbroker_kv is ours: broker-wide settings that must survive restarts
// (the generated resume-token signing key).
const pgMeshbrokerKV = `CREATE TABLE IF NOT EXISTS mesh.meshbroker_kv (
	key text PRIMARY KEY NOT NULL,
	value text NOT NULL
)`

// meshbroker_lease is ours: one row per presence this broker holds as a
// lease (online or in its grace window), with what a silent reattach after
// a restart needs and mesh.presence lacks. A row is inserted with its
// presence, rewritten in batches as the lease changes, and deleted when the
// presence is evicted; a starting broker restores every row. The owner_*
// columns name the process that holds it, so a later multi-node broker can
// adopt the leases of a node whose heartbeat stopped (meshbroker_node)
// without a schema change.
const pgMeshbrokerLease = `CREATE TABLE IF NOT EXISTS mesh.meshbroker_lease (
	presence_id text PRIMARY KEY NOT NULL REFERENCES mesh.presence(id) ON DELETE CASCADE ON UPDATE CASCADE,
	mesh_id text NOT NULL,
	member_id text NOT NULL,
	role text NOT NULL,
	has_session_pubkey boolean NOT NULL,
	session_id text NOT NULL,
	display_name text NOT NULL,
	cwd text NOT NULL,
	hostname text NOT NULL DEFAULT '',
	peer_type text NOT NULL DEFAULT '',
	channel text NOT NULL DEFAULT '',
	model text NOT NULL DEFAULT '',
	visible boolean NOT NULL DEFAULT true,
	profile jsonb NOT NULL DEFAULT '{}'::jsonb,
	stats jsonb,
	attestation_expires_at timestamp,
	lease_state text NOT NULL,
	lease_until timestamp,
	lease_generation bigint NOT NULL DEFAULT 0,
	owner_node_id text NOT NULL,
	owner_epoch bigint NOT NULL,
	updated_at timestamp DEFAULT now() NOT NULL
)`

// meshbroker_node is ours: one row per broker process that owned leases,
// with its epoch (one more than any before it) and heartbeat.
const pgMeshbrokerNode = `CREATE TABLE IF NOT EXISTS mesh.meshbroker_node (
	node_id text PRIMARY KEY NOT NULL,
	epoch bigint NOT NULL,
	hostname text NOT NULL,
	pid integer NOT NULL,
	started_at timestamp NOT NULL,
	heartbeat_at timestamp NOT NULL,
	stopped_at timestamp,
	state text NOT NULL
)`

// meshbroker_realtime is ours: the extras that follow a lease across a
// restart (URL watches, stream subscriptions, MCP registry entries, mesh
// clocks), one row each, rewritten per mesh by the realtime service.
const pgMeshbrokerRealtime = `CREATE TABLE IF NOT EXISTS mesh.meshbroker_realtime (
	mesh_id text NOT NULL,
	kind text NOT NULL,
	key text NOT NULL,
	presence_id text,
	body jsonb NOT NULL,
	updated_at timestamp DEFAULT now() NOT NULL,
	PRIMARY KEY (mesh_id, kind, key)
)`

// postgresTables is in creation order: every table after the ones it references.
func postgresTables() []tableDDL {
	return append([]tableDDL{
		{"mesh", pgMesh, nil},
		{"member", pgMember, []string{
			`CREATE INDEX IF NOT EXISTS member_dashboard_user_idx ON mesh.member (dashboard_user_id)`,
			`CREATE INDEX IF NOT EXISTS member_peer_grants_gin_idx ON mesh.member USING gin (peer_grants)`,
		}},
		{"presence", pgPresence, []string{
			// meshbroker's own: hook lookups by cwd, list_peers by member.
			`CREATE INDEX IF NOT EXISTS meshbroker_presence_cwd_idx ON mesh.presence (cwd) WHERE disconnected_at IS NULL`,
			`CREATE INDEX IF NOT EXISTS meshbroker_presence_member_idx ON mesh.presence (member_id) WHERE disconnected_at IS NULL`,
			// Whose is a session key or label, ended presences included: a
			// member hello may not claim another member's (H3).
			`CREATE INDEX IF NOT EXISTS meshbroker_presence_session_pubkey_idx ON mesh.presence (session_pubkey) WHERE session_pubkey IS NOT NULL`,
		}},
		{"pending_status", pgPendingStatus, nil},
		{"message_queue", pgMessageQueue, []string{
			// meshbroker's own indexes (the reference has only the primary
			// keys): drains and the idempotency check scan undelivered rows
			// of one mesh; delivered rows are never deleted, so without a
			// partial index every drain would read the whole history.
			`CREATE INDEX IF NOT EXISTS meshbroker_mq_undelivered_idx ON mesh.message_queue (mesh_id, created_at) WHERE delivered_at IS NULL`,
			`CREATE INDEX IF NOT EXISTS meshbroker_mq_client_msg_idx ON mesh.message_queue (mesh_id, client_message_id) WHERE client_message_id IS NOT NULL`,
			`CREATE INDEX IF NOT EXISTS meshbroker_mq_target_idx ON mesh.message_queue (mesh_id, target_spec, created_at) WHERE delivered_at IS NULL`,
		}},
		{"audit_log", pgAuditLog, []string{
			`CREATE INDEX IF NOT EXISTS audit_log_mesh_id_idx ON mesh.audit_log (mesh_id)`,
			`CREATE INDEX IF NOT EXISTS audit_log_created_at_idx ON mesh.audit_log (created_at)`,
		}},
		{"peer_state", pgPeerState, nil},
		{"state", pgState, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS state_mesh_key_idx ON mesh.state (mesh_id, "key")`,
		}},
		{"stream", pgStream, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS stream_mesh_name_idx ON mesh.stream (mesh_id, name)`,
		}},
		{"file", pgFile, nil},
		{"service", pgService, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS service_mesh_name_idx ON mesh.service (mesh_id, name)`,
		}},
		{"topic", pgTopic, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS topic_mesh_name_unique ON mesh.topic (mesh_id, name)`,
		}},
		{"topic_member", pgTopicMember, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS topic_member_unique ON mesh.topic_member (topic_id, member_id)`,
			`CREATE INDEX IF NOT EXISTS topic_member_by_member ON mesh.topic_member (member_id)`,
		}},
		{"topic_message", pgTopicMessage, []string{
			`CREATE INDEX IF NOT EXISTS topic_message_by_topic_time ON mesh.topic_message (topic_id, created_at)`,
			`CREATE INDEX IF NOT EXISTS topic_message_by_version ON mesh.topic_message (body_version)`,
			`CREATE INDEX IF NOT EXISTS topic_message_by_reply_to ON mesh.topic_message (reply_to_id)`,
		}},
		{"notification", pgNotification, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS notification_unique ON mesh.notification (message_id, recipient_member_id)`,
			`CREATE INDEX IF NOT EXISTS notification_by_recipient_unread ON mesh.notification (recipient_member_id, created_at DESC) WHERE read_at IS NULL`,
			`CREATE INDEX IF NOT EXISTS notification_by_recipient ON mesh.notification (recipient_member_id, created_at DESC)`,
			`CREATE INDEX IF NOT EXISTS notification_by_mesh ON mesh.notification (mesh_id, created_at DESC)`,
		}},
		{"topic_member_key", pgTopicMemberKey, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS topic_member_key_unique ON mesh.topic_member_key (topic_id, member_id)`,
			`CREATE INDEX IF NOT EXISTS topic_member_key_by_member ON mesh.topic_member_key (member_id)`,
		}},
		{"invite", pgInvite, pgInviteIndexes},
		{"meshbroker_schema", pgMeshbrokerSchema, nil},
		{"meshbroker_kv", pgMeshbrokerKV, nil},
		{"meshbroker_lease", pgMeshbrokerLease, []string{
			`CREATE INDEX IF NOT EXISTS meshbroker_lease_owner_idx ON mesh.meshbroker_lease (owner_node_id)`,
		}},
		{"meshbroker_node", pgMeshbrokerNode, nil},
		{"meshbroker_realtime", pgMeshbrokerRealtime, nil},
	}, toolboxPostgresTables()...)
}

// SQLite DDL: the same tables, columns, defaults, keys and indexes, with
//   - TEXT for text, enums (plus a CHECK of the values) and jsonb (plus a
//     json_valid CHECK; this SQLite's json_valid(NULL) is 0, not NULL, hence
//     "x IS NULL OR" on nullable columns), and for text[] (a JSON array);
//   - DATETIME for timestamps, so the driver parses them, holding the fixed
//     width UTC text of SQLiteTimeLayout; {now} is the matching default;
//   - INTEGER / BOOLEAN (0 or 1) for integer / boolean.
// {enum:NAME} expands to the parenthesized value list of mesh.NAME. The GIN
// index on member.peer_grants has no SQLite counterpart and is left out.

const sqliteMesh = `CREATE TABLE IF NOT EXISTS mesh (
	id TEXT PRIMARY KEY NOT NULL,
	name TEXT NOT NULL,
	slug TEXT NOT NULL,
	owner_user_id TEXT NOT NULL,
	visibility TEXT NOT NULL DEFAULT 'private' CHECK (visibility IN {enum:visibility}),
	transport TEXT NOT NULL DEFAULT 'managed' CHECK (transport IN {enum:transport}),
	max_peers INTEGER,
	tier TEXT NOT NULL DEFAULT 'free' CHECK (tier IN {enum:tier}),
	created_at DATETIME NOT NULL DEFAULT {now},
	archived_at DATETIME,
	owner_pubkey TEXT,
	owner_secret_key TEXT,
	root_key TEXT,
	self_editable TEXT DEFAULT '{"displayName":true,"roleTag":true,"groups":true,"messageMode":true}' CHECK (self_editable IS NULL OR json_valid(self_editable))
)`

const sqliteMember = `CREATE TABLE IF NOT EXISTS member (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	user_id TEXT,
	peer_pubkey TEXT NOT NULL,
	display_name TEXT NOT NULL,
	role TEXT NOT NULL DEFAULT 'member' CHECK (role IN {enum:role}),
	joined_at DATETIME NOT NULL DEFAULT {now},
	last_seen_at DATETIME,
	revoked_at DATETIME,
	role_tag TEXT,
	default_groups TEXT DEFAULT '[]' CHECK (default_groups IS NULL OR json_valid(default_groups)),
	message_mode TEXT DEFAULT 'push',
	dashboard_user_id TEXT,
	peer_grants TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(peer_grants))
)`

const sqlitePresence = `CREATE TABLE IF NOT EXISTS presence (
	id TEXT PRIMARY KEY NOT NULL,
	member_id TEXT NOT NULL REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	session_id TEXT NOT NULL,
	pid INTEGER NOT NULL,
	cwd TEXT NOT NULL,
	status TEXT NOT NULL DEFAULT 'idle' CHECK (status IN {enum:presence_status}),
	status_source TEXT NOT NULL DEFAULT 'jsonl' CHECK (status_source IN {enum:presence_status_source}),
	status_updated_at DATETIME NOT NULL DEFAULT {now},
	connected_at DATETIME NOT NULL DEFAULT {now},
	last_ping_at DATETIME NOT NULL DEFAULT {now},
	disconnected_at DATETIME,
	summary TEXT,
	display_name TEXT,
	session_pubkey TEXT,
	"groups" TEXT DEFAULT '[]' CHECK ("groups" IS NULL OR json_valid("groups")),
	role TEXT NOT NULL DEFAULT 'session'
)`

const sqlitePendingStatus = `CREATE TABLE IF NOT EXISTS pending_status (
	id TEXT PRIMARY KEY NOT NULL,
	pid INTEGER NOT NULL,
	cwd TEXT NOT NULL,
	status TEXT NOT NULL,
	status_source TEXT NOT NULL,
	created_at DATETIME NOT NULL DEFAULT {now},
	applied_at DATETIME
)`

const sqliteMessageQueue = `CREATE TABLE IF NOT EXISTS message_queue (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	sender_member_id TEXT NOT NULL REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	target_spec TEXT NOT NULL,
	priority TEXT NOT NULL DEFAULT 'next' CHECK (priority IN {enum:message_priority}),
	nonce TEXT NOT NULL,
	ciphertext TEXT NOT NULL,
	created_at DATETIME NOT NULL DEFAULT {now},
	delivered_at DATETIME,
	expires_at DATETIME,
	sender_session_pubkey TEXT,
	client_message_id TEXT,
	request_fingerprint TEXT,
	claimed_at DATETIME,
	claim_id TEXT,
	claim_expires_at DATETIME
)`

// AUTOINCREMENT, unlike a bare INTEGER PRIMARY KEY, never reuses an id, which
// matches an identity column and keeps the chain order strictly increasing.
const sqliteAuditLog = `CREATE TABLE IF NOT EXISTS audit_log (
	id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	event_type TEXT NOT NULL,
	actor_member_id TEXT,
	actor_display_name TEXT,
	payload TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(payload)),
	prev_hash TEXT NOT NULL,
	hash TEXT NOT NULL,
	created_at DATETIME NOT NULL DEFAULT {now}
)`

const sqlitePeerState = `CREATE TABLE IF NOT EXISTS peer_state (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	member_id TEXT NOT NULL REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	"groups" TEXT DEFAULT '[]' CHECK ("groups" IS NULL OR json_valid("groups")),
	profile TEXT DEFAULT '{}' CHECK (profile IS NULL OR json_valid(profile)),
	visible BOOLEAN NOT NULL DEFAULT 1 CHECK (visible IN (0, 1)),
	last_summary TEXT,
	last_display_name TEXT,
	cumulative_stats TEXT DEFAULT '{"messagesIn":0,"messagesOut":0,"toolCalls":0,"errors":0}' CHECK (cumulative_stats IS NULL OR json_valid(cumulative_stats)),
	last_seen_at DATETIME,
	created_at DATETIME NOT NULL DEFAULT {now},
	updated_at DATETIME NOT NULL DEFAULT {now},
	CONSTRAINT peer_state_mesh_member_idx UNIQUE (mesh_id, member_id)
)`

const sqliteState = `CREATE TABLE IF NOT EXISTS state (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	"key" TEXT NOT NULL,
	value TEXT NOT NULL CHECK (json_valid(value)),
	updated_by_presence TEXT,
	updated_by_name TEXT,
	updated_at DATETIME NOT NULL DEFAULT {now}
)`

const sqliteStream = `CREATE TABLE IF NOT EXISTS stream (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	name TEXT NOT NULL,
	created_by_name TEXT,
	created_at DATETIME NOT NULL DEFAULT {now}
)`

const sqliteFile = `CREATE TABLE IF NOT EXISTS file (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	name TEXT NOT NULL,
	size_bytes INTEGER NOT NULL,
	mime_type TEXT,
	minio_key TEXT NOT NULL,
	tags TEXT DEFAULT '[]' CHECK (tags IS NULL OR json_valid(tags)),
	persistent BOOLEAN NOT NULL DEFAULT 1 CHECK (persistent IN (0, 1)),
	uploaded_by_name TEXT,
	uploaded_by_member TEXT REFERENCES member(id),
	target_spec TEXT,
	uploaded_at DATETIME NOT NULL DEFAULT {now},
	expires_at DATETIME,
	deleted_at DATETIME,
	encrypted BOOLEAN NOT NULL DEFAULT 0 CHECK (encrypted IN (0, 1)),
	owner_pubkey TEXT
)`

const sqliteService = `CREATE TABLE IF NOT EXISTS service (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	name TEXT NOT NULL,
	type TEXT NOT NULL,
	source_type TEXT NOT NULL,
	source_file_id TEXT REFERENCES file(id),
	source_git_url TEXT,
	source_git_branch TEXT DEFAULT 'main',
	source_git_sha TEXT,
	prev_git_sha TEXT,
	description TEXT NOT NULL,
	instructions TEXT,
	tools_schema TEXT CHECK (tools_schema IS NULL OR json_valid(tools_schema)),
	manifest TEXT CHECK (manifest IS NULL OR json_valid(manifest)),
	runtime TEXT,
	status TEXT DEFAULT 'stopped',
	config TEXT DEFAULT '{}' CHECK (config IS NULL OR json_valid(config)),
	last_health DATETIME,
	restart_count INTEGER DEFAULT 0,
	version INTEGER DEFAULT 1,
	scope TEXT DEFAULT '{"type":"peer"}' CHECK (scope IS NULL OR json_valid(scope)),
	deployed_by TEXT REFERENCES member(id),
	deployed_by_name TEXT,
	created_at DATETIME NOT NULL DEFAULT {now},
	updated_at DATETIME NOT NULL DEFAULT {now}
)`

const sqliteTopic = `CREATE TABLE IF NOT EXISTS topic (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	name TEXT NOT NULL,
	description TEXT,
	visibility TEXT NOT NULL DEFAULT 'public' CHECK (visibility IN {enum:topic_visibility}),
	created_by_member_id TEXT REFERENCES member(id) ON DELETE SET NULL ON UPDATE CASCADE,
	created_at DATETIME NOT NULL DEFAULT {now},
	archived_at DATETIME,
	encrypted_key_pubkey TEXT
)`

const sqliteTopicMember = `CREATE TABLE IF NOT EXISTS topic_member (
	topic_id TEXT NOT NULL REFERENCES topic(id) ON DELETE CASCADE ON UPDATE CASCADE,
	member_id TEXT NOT NULL REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	role TEXT NOT NULL DEFAULT 'member' CHECK (role IN {enum:topic_member_role}),
	joined_at DATETIME NOT NULL DEFAULT {now},
	last_read_at DATETIME
)`

const sqliteTopicMessage = `CREATE TABLE IF NOT EXISTS topic_message (
	id TEXT PRIMARY KEY NOT NULL,
	topic_id TEXT NOT NULL REFERENCES topic(id) ON DELETE CASCADE ON UPDATE CASCADE,
	sender_member_id TEXT NOT NULL REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	sender_session_pubkey TEXT,
	nonce TEXT NOT NULL,
	ciphertext TEXT NOT NULL,
	created_at DATETIME NOT NULL DEFAULT {now},
	body_version INTEGER NOT NULL DEFAULT 1,
	reply_to_id TEXT REFERENCES topic_message(id) ON DELETE SET NULL ON UPDATE CASCADE
)`

const sqliteNotification = `CREATE TABLE IF NOT EXISTS notification (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	topic_id TEXT NOT NULL REFERENCES topic(id) ON DELETE CASCADE ON UPDATE CASCADE,
	message_id TEXT NOT NULL REFERENCES topic_message(id) ON DELETE CASCADE ON UPDATE CASCADE,
	recipient_member_id TEXT NOT NULL REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	sender_member_id TEXT NOT NULL REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	kind TEXT NOT NULL DEFAULT 'mention',
	created_at DATETIME NOT NULL DEFAULT {now},
	read_at DATETIME
)`

const sqliteTopicMemberKey = `CREATE TABLE IF NOT EXISTS topic_member_key (
	id TEXT PRIMARY KEY NOT NULL,
	topic_id TEXT NOT NULL REFERENCES topic(id) ON DELETE CASCADE ON UPDATE CASCADE,
	member_id TEXT NOT NULL REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	encrypted_key TEXT NOT NULL,
	nonce TEXT NOT NULL,
	created_at DATETIME NOT NULL DEFAULT {now},
	rotated_at DATETIME
)`

const sqliteMeshbrokerSchema = `CREATE TABLE IF NOT EXISTS meshbroker_schema (
	version TEXT PRIMARY KEY NOT NULL,
	applied_at DATETIME NOT NULL DEFAULT {now}
)`

const sqliteMeshbrokerKV = `CREATE TABLE IF NOT EXISTS meshbroker_kv (
	key TEXT PRIMARY KEY NOT NULL,
	value TEXT NOT NULL
)`

const sqliteMeshbrokerLease = `CREATE TABLE IF NOT EXISTS meshbroker_lease (
	presence_id TEXT PRIMARY KEY NOT NULL REFERENCES presence(id) ON DELETE CASCADE ON UPDATE CASCADE,
	mesh_id TEXT NOT NULL,
	member_id TEXT NOT NULL,
	role TEXT NOT NULL,
	has_session_pubkey BOOLEAN NOT NULL,
	session_id TEXT NOT NULL,
	display_name TEXT NOT NULL,
	cwd TEXT NOT NULL,
	hostname TEXT NOT NULL DEFAULT '',
	peer_type TEXT NOT NULL DEFAULT '',
	channel TEXT NOT NULL DEFAULT '',
	model TEXT NOT NULL DEFAULT '',
	visible BOOLEAN NOT NULL DEFAULT 1,
	profile TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(profile)),
	stats TEXT CHECK (stats IS NULL OR json_valid(stats)),
	attestation_expires_at DATETIME,
	lease_state TEXT NOT NULL,
	lease_until DATETIME,
	lease_generation INTEGER NOT NULL DEFAULT 0,
	owner_node_id TEXT NOT NULL,
	owner_epoch INTEGER NOT NULL,
	updated_at DATETIME NOT NULL DEFAULT {now}
)`

const sqliteMeshbrokerNode = `CREATE TABLE IF NOT EXISTS meshbroker_node (
	node_id TEXT PRIMARY KEY NOT NULL,
	epoch INTEGER NOT NULL,
	hostname TEXT NOT NULL,
	pid INTEGER NOT NULL,
	started_at DATETIME NOT NULL,
	heartbeat_at DATETIME NOT NULL,
	stopped_at DATETIME,
	state TEXT NOT NULL
)`

const sqliteMeshbrokerRealtime = `CREATE TABLE IF NOT EXISTS meshbroker_realtime (
	mesh_id TEXT NOT NULL,
	kind TEXT NOT NULL,
	key TEXT NOT NULL,
	presence_id TEXT,
	body TEXT NOT NULL CHECK (json_valid(body)),
	updated_at DATETIME NOT NULL DEFAULT {now},
	PRIMARY KEY (mesh_id, kind, key)
)`

// sqliteNow is the SQLite default for timestamp columns. strftime's %f gives
// milliseconds ("SS.SSS"); the literal 000 pads to SQLiteTimeLayout's six
// digits so defaults and Go-written times have the same width.
const sqliteNow = `(strftime('%Y-%m-%d %H:%M:%f000', 'now'))`

// sqliteTables mirrors postgresTables.
func sqliteTables() []tableDDL {
	tables := []tableDDL{
		{"mesh", sqliteMesh, nil},
		{"member", sqliteMember, []string{
			`CREATE INDEX IF NOT EXISTS member_dashboard_user_idx ON member (dashboard_user_id)`,
		}},
		{"presence", sqlitePresence, []string{
			// meshbroker's own: hook lookups by cwd, list_peers by member.
			`CREATE INDEX IF NOT EXISTS meshbroker_presence_cwd_idx ON presence (cwd) WHERE disconnected_at IS NULL`,
			`CREATE INDEX IF NOT EXISTS meshbroker_presence_member_idx ON presence (member_id) WHERE disconnected_at IS NULL`,
			`CREATE INDEX IF NOT EXISTS meshbroker_presence_session_pubkey_idx ON presence (session_pubkey) WHERE session_pubkey IS NOT NULL`,
		}},
		{"pending_status", sqlitePendingStatus, nil},
		{"message_queue", sqliteMessageQueue, []string{
			// meshbroker's own indexes (the reference has only the primary
			// keys): drains and the idempotency check scan undelivered rows
			// of one mesh; delivered rows are never deleted, so without a
			// partial index every drain would read the whole history.
			`CREATE INDEX IF NOT EXISTS meshbroker_mq_undelivered_idx ON message_queue (mesh_id, created_at) WHERE delivered_at IS NULL`,
			`CREATE INDEX IF NOT EXISTS meshbroker_mq_client_msg_idx ON message_queue (mesh_id, client_message_id) WHERE client_message_id IS NOT NULL`,
			`CREATE INDEX IF NOT EXISTS meshbroker_mq_target_idx ON message_queue (mesh_id, target_spec, created_at) WHERE delivered_at IS NULL`,
		}},
		{"audit_log", sqliteAuditLog, []string{
			`CREATE INDEX IF NOT EXISTS audit_log_mesh_id_idx ON audit_log (mesh_id)`,
			`CREATE INDEX IF NOT EXISTS audit_log_created_at_idx ON audit_log (created_at)`,
		}},
		{"peer_state", sqlitePeerState, nil},
		{"state", sqliteState, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS state_mesh_key_idx ON state (mesh_id, "key")`,
		}},
		{"stream", sqliteStream, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS stream_mesh_name_idx ON stream (mesh_id, name)`,
		}},
		{"file", sqliteFile, nil},
		{"service", sqliteService, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS service_mesh_name_idx ON service (mesh_id, name)`,
		}},
		{"topic", sqliteTopic, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS topic_mesh_name_unique ON topic (mesh_id, name)`,
		}},
		{"topic_member", sqliteTopicMember, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS topic_member_unique ON topic_member (topic_id, member_id)`,
			`CREATE INDEX IF NOT EXISTS topic_member_by_member ON topic_member (member_id)`,
		}},
		{"topic_message", sqliteTopicMessage, []string{
			`CREATE INDEX IF NOT EXISTS topic_message_by_topic_time ON topic_message (topic_id, created_at)`,
			`CREATE INDEX IF NOT EXISTS topic_message_by_version ON topic_message (body_version)`,
			`CREATE INDEX IF NOT EXISTS topic_message_by_reply_to ON topic_message (reply_to_id)`,
		}},
		{"notification", sqliteNotification, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS notification_unique ON notification (message_id, recipient_member_id)`,
			`CREATE INDEX IF NOT EXISTS notification_by_recipient_unread ON notification (recipient_member_id, created_at DESC) WHERE read_at IS NULL`,
			`CREATE INDEX IF NOT EXISTS notification_by_recipient ON notification (recipient_member_id, created_at DESC)`,
			`CREATE INDEX IF NOT EXISTS notification_by_mesh ON notification (mesh_id, created_at DESC)`,
		}},
		{"topic_member_key", sqliteTopicMemberKey, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS topic_member_key_unique ON topic_member_key (topic_id, member_id)`,
			`CREATE INDEX IF NOT EXISTS topic_member_key_by_member ON topic_member_key (member_id)`,
		}},
		{"invite", sqliteInvite, sqliteInviteIndexes},
		{"meshbroker_schema", sqliteMeshbrokerSchema, nil},
		{"meshbroker_kv", sqliteMeshbrokerKV, nil},
		{"meshbroker_lease", sqliteMeshbrokerLease, []string{
			`CREATE INDEX IF NOT EXISTS meshbroker_lease_owner_idx ON meshbroker_lease (owner_node_id)`,
		}},
		{"meshbroker_node", sqliteMeshbrokerNode, nil},
		{"meshbroker_realtime", sqliteMeshbrokerRealtime, nil},
	}
	tables = append(tables, toolboxSQLiteTables()...)
	for i := range tables {
		tables[i].create = expandSQLite(tables[i].create)
	}
	return tables
}

var sqliteEnumRE = regexp.MustCompile(`\{enum:(\w+)\}`)

// expandSQLite fills in {now} and {enum:NAME}. An unknown enum name is a bug
// in the constants above, caught by any test that bootstraps SQLite.
func expandSQLite(ddl string) string {
	values := make(map[string][]string)
	for _, e := range pgEnums() {
		values[e.name] = e.values
	}
	ddl = strings.ReplaceAll(ddl, "{now}", sqliteNow)
	return sqliteEnumRE.ReplaceAllStringFunc(ddl, func(m string) string {
		name := sqliteEnumRE.FindStringSubmatch(m)[1]
		vals, ok := values[name]
		if !ok {
			panic(fmt.Sprintf("models: SQLite DDL names unknown enum %q", name))
		}
		return "(" + quoteList(vals) + ")"
	})
}

// quoteList renders values as 'a', 'b'. The values are our own constants,
// none of which contains a quote.
func quoteList(values []string) string {
	quoted := make([]string, len(values))
	for i, v := range values {
		quoted[i] = "'" + v + "'"
	}
	return strings.Join(quoted, ", ")
}
