package models

import "time"

// The shared toolbox's tables: mesh.memory, mesh.task, mesh.scheduled_message,
// mesh.context, mesh.skill and mesh.vault_entry. On Postgres they follow the
// reference exactly (migrations 0008, 0010 and 0013 for memory, context and
// task; mesh.ts alone for skill and vault_entry; the broker's own CREATE for
// scheduled_message), so a database the web app migrated is used as it is.
// The models exist for Bootstrap's column check; package toolbox writes its
// own SQL. Text arrays are text[] on Postgres and a JSON array on SQLite.

// Memory is a row of mesh.memory: one remembered note of a mesh. On Postgres
// the generated search_vector column (to_tsvector('english', content)) and
// its GIN index memory_search_idx serve recall; on SQLite the FTS5 table
// memory_fts, filled by a trigger, does.
type Memory struct {
	ID               string     `gorm:"column:id;primaryKey"`
	MeshID           string     `gorm:"column:mesh_id"`
	Content          string     `gorm:"column:content"`
	Tags             []string   `gorm:"column:tags;serializer:json"`
	RememberedBy     *string    `gorm:"column:remembered_by"`
	RememberedByName *string    `gorm:"column:remembered_by_name"`
	RememberedAt     time.Time  `gorm:"column:remembered_at"`
	ForgottenAt      *time.Time `gorm:"column:forgotten_at"`
}

// Task is a row of mesh.task, the mesh's task board. Status is free text in
// the reference: "open", "claimed" or "done".
type Task struct {
	ID                string     `gorm:"column:id;primaryKey"`
	MeshID            string     `gorm:"column:mesh_id"`
	Title             string     `gorm:"column:title"`
	Assignee          *string    `gorm:"column:assignee"`
	ClaimedByName     *string    `gorm:"column:claimed_by_name"`
	ClaimedByPresence *string    `gorm:"column:claimed_by_presence"`
	Priority          string     `gorm:"column:priority"`
	Status            string     `gorm:"column:status"`
	Tags              []string   `gorm:"column:tags;serializer:json"`
	Result            *string    `gorm:"column:result"`
	CreatedByName     *string    `gorm:"column:created_by_name"`
	CreatedAt         time.Time  `gorm:"column:created_at"`
	ClaimedAt         *time.Time `gorm:"column:claimed_at"`
	CompletedAt       *time.Time `gorm:"column:completed_at"`
}

// ScheduledMessage is a row of mesh.scheduled_message. DeliverAt is the next
// fire time (for a cron row it moves forward after each fire); a one-shot
// row is pending while FiredAt is null, a cron row until it is cancelled.
// Message is the body in plaintext, as in the reference.
type ScheduledMessage struct {
	ID         string     `gorm:"column:id;primaryKey"`
	MeshID     string     `gorm:"column:mesh_id"`
	PresenceID *string    `gorm:"column:presence_id"`
	MemberID   string     `gorm:"column:member_id"`
	To         string     `gorm:"column:to"`
	Message    string     `gorm:"column:message"`
	DeliverAt  *time.Time `gorm:"column:deliver_at"`
	Cron       *string    `gorm:"column:cron"`
	Subtype    *string    `gorm:"column:subtype"`
	FiredCount int32      `gorm:"column:fired_count"`
	Cancelled  bool       `gorm:"column:cancelled"`
	FiredAt    *time.Time `gorm:"column:fired_at"`
	CreatedAt  time.Time  `gorm:"column:created_at"`
}

// Context is a row of mesh.context: the latest shared working context of one
// member (unique on mesh_id, member_id).
type Context struct {
	ID          string    `gorm:"column:id;primaryKey"`
	MeshID      string    `gorm:"column:mesh_id"`
	PresenceID  *string   `gorm:"column:presence_id"`
	PeerName    *string   `gorm:"column:peer_name"`
	Summary     string    `gorm:"column:summary"`
	FilesRead   []string  `gorm:"column:files_read;serializer:json"`
	KeyFindings []string  `gorm:"column:key_findings;serializer:json"`
	Tags        []string  `gorm:"column:tags;serializer:json"`
	UpdatedAt   time.Time `gorm:"column:updated_at"`
	MemberID    *string   `gorm:"column:member_id"`
}

// Skill is a row of mesh.skill, unique on (mesh_id, name). The table's
// source_type, bundle_file_id and git_* columns (skill deploy, out of scope)
// are created but not required of an existing table.
type Skill struct {
	ID             string    `gorm:"column:id;primaryKey"`
	MeshID         string    `gorm:"column:mesh_id"`
	Name           string    `gorm:"column:name"`
	Description    string    `gorm:"column:description"`
	Instructions   string    `gorm:"column:instructions"`
	Tags           []string  `gorm:"column:tags;serializer:json"`
	AuthorMemberID *string   `gorm:"column:author_member_id"`
	AuthorName     *string   `gorm:"column:author_name"`
	Manifest       JSON      `gorm:"column:manifest"`
	CreatedAt      time.Time `gorm:"column:created_at"`
	UpdatedAt      time.Time `gorm:"column:updated_at"`
}

// VaultEntry is a row of mesh.vault_entry: one member's sealed secret. The
// broker stores ciphertext, nonce and sealed key as given and never reads them.
type VaultEntry struct {
	ID          string    `gorm:"column:id;primaryKey"`
	MeshID      string    `gorm:"column:mesh_id"`
	MemberID    string    `gorm:"column:member_id"`
	Key         string    `gorm:"column:key"`
	Ciphertext  string    `gorm:"column:ciphertext"`
	Nonce       string    `gorm:"column:nonce"`
	SealedKey   string    `gorm:"column:sealed_key"`
	EntryType   *string   `gorm:"column:entry_type"`
	MountPath   *string   `gorm:"column:mount_path"`
	Description *string   `gorm:"column:description"`
	CreatedAt   time.Time `gorm:"column:created_at"`
	UpdatedAt   time.Time `gorm:"column:updated_at"`
}

func toolboxModels() []any {
	return []any{&Memory{}, &Task{}, &ScheduledMessage{}, &Context{}, &Skill{}, &VaultEntry{}}
}

// Postgres DDL, in the reference's shapes.

const pgMemory = `CREATE TABLE IF NOT EXISTS mesh.memory (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	content text NOT NULL,
	tags text[] DEFAULT '{}',
	remembered_by text,
	remembered_by_name text,
	remembered_at timestamp DEFAULT now() NOT NULL,
	forgotten_at timestamp,
	search_vector tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED,
	CONSTRAINT memory_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	CONSTRAINT memory_remembered_by_member_id_fk FOREIGN KEY (remembered_by) REFERENCES mesh.member(id) ON DELETE NO ACTION ON UPDATE NO ACTION
)`

const pgContext = `CREATE TABLE IF NOT EXISTS mesh.context (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	presence_id text,
	peer_name text,
	summary text NOT NULL,
	files_read text[] DEFAULT '{}',
	key_findings text[] DEFAULT '{}',
	tags text[] DEFAULT '{}',
	updated_at timestamp DEFAULT now() NOT NULL,
	member_id text,
	CONSTRAINT context_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	CONSTRAINT context_presence_id_presence_id_fk FOREIGN KEY (presence_id) REFERENCES mesh.presence(id) ON DELETE CASCADE ON UPDATE NO ACTION,
	CONSTRAINT context_member_id_member_id_fk FOREIGN KEY (member_id) REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE
)`

const pgTask = `CREATE TABLE IF NOT EXISTS mesh.task (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	title text NOT NULL,
	assignee text,
	claimed_by_name text,
	claimed_by_presence text,
	priority text DEFAULT 'normal' NOT NULL,
	status text DEFAULT 'open' NOT NULL,
	tags text[] DEFAULT '{}',
	result text,
	created_by_name text,
	created_at timestamp DEFAULT now() NOT NULL,
	claimed_at timestamp,
	completed_at timestamp,
	CONSTRAINT task_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	CONSTRAINT task_claimed_by_presence_presence_id_fk FOREIGN KEY (claimed_by_presence) REFERENCES mesh.presence(id) ON DELETE NO ACTION ON UPDATE NO ACTION
)`

// mesh.skill and mesh.vault_entry come from mesh.ts alone; constraint names
// are the ones drizzle would generate.
const pgSkill = `CREATE TABLE IF NOT EXISTS mesh.skill (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	name text NOT NULL,
	description text NOT NULL,
	instructions text NOT NULL,
	tags text[] DEFAULT '{}',
	author_member_id text,
	author_name text,
	source_type text DEFAULT 'inline',
	bundle_file_id text,
	git_url text,
	git_branch text DEFAULT 'main',
	git_sha text,
	manifest jsonb,
	created_at timestamp DEFAULT now() NOT NULL,
	updated_at timestamp DEFAULT now() NOT NULL,
	CONSTRAINT skill_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	CONSTRAINT skill_author_member_id_member_id_fk FOREIGN KEY (author_member_id) REFERENCES mesh.member(id) ON DELETE NO ACTION ON UPDATE NO ACTION,
	CONSTRAINT skill_bundle_file_id_file_id_fk FOREIGN KEY (bundle_file_id) REFERENCES mesh.file(id) ON DELETE NO ACTION ON UPDATE NO ACTION
)`

const pgVaultEntry = `CREATE TABLE IF NOT EXISTS mesh.vault_entry (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL,
	member_id text NOT NULL,
	"key" text NOT NULL,
	ciphertext text NOT NULL,
	nonce text NOT NULL,
	sealed_key text NOT NULL,
	entry_type text DEFAULT 'env',
	mount_path text,
	description text,
	created_at timestamp DEFAULT now() NOT NULL,
	updated_at timestamp DEFAULT now() NOT NULL,
	CONSTRAINT vault_entry_mesh_id_mesh_id_fk FOREIGN KEY (mesh_id) REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	CONSTRAINT vault_entry_member_id_member_id_fk FOREIGN KEY (member_id) REFERENCES mesh.member(id) ON DELETE NO ACTION ON UPDATE NO ACTION
)`

// The reference broker creates this one itself, with inline references.
const pgScheduledMessage = `CREATE TABLE IF NOT EXISTS mesh.scheduled_message (
	id text PRIMARY KEY NOT NULL,
	mesh_id text NOT NULL REFERENCES mesh.mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	presence_id text,
	member_id text NOT NULL REFERENCES mesh.member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	"to" text NOT NULL,
	message text NOT NULL,
	deliver_at timestamp,
	cron text,
	subtype text,
	fired_count integer NOT NULL DEFAULT 0,
	cancelled boolean NOT NULL DEFAULT false,
	fired_at timestamp,
	created_at timestamp NOT NULL DEFAULT now()
)`

// toolboxPostgresTables follow postgresTables; the meshbroker_* indexes are
// our own (the reference has only the ones named after their table).
func toolboxPostgresTables() []tableDDL {
	return []tableDDL{
		{"memory", pgMemory, []string{
			`CREATE INDEX IF NOT EXISTS memory_search_idx ON mesh.memory USING gin (search_vector)`,
			`CREATE INDEX IF NOT EXISTS meshbroker_memory_mesh_idx ON mesh.memory (mesh_id) WHERE forgotten_at IS NULL`,
		}},
		{"context", pgContext, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS context_mesh_member_idx ON mesh.context (mesh_id, member_id)`,
		}},
		{"task", pgTask, []string{
			`CREATE INDEX IF NOT EXISTS meshbroker_task_mesh_idx ON mesh.task (mesh_id, created_at)`,
		}},
		{"skill", pgSkill, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS skill_mesh_name_idx ON mesh.skill (mesh_id, name)`,
		}},
		{"vault_entry", pgVaultEntry, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS vault_entry_mesh_member_key_idx ON mesh.vault_entry (mesh_id, member_id, "key")`,
		}},
		{"scheduled_message", pgScheduledMessage, []string{
			`CREATE INDEX IF NOT EXISTS meshbroker_scheduled_due_idx ON mesh.scheduled_message (deliver_at) WHERE cancelled = false AND (cron IS NOT NULL OR fired_at IS NULL)`,
			`CREATE INDEX IF NOT EXISTS meshbroker_scheduled_member_idx ON mesh.scheduled_message (mesh_id, member_id) WHERE cancelled = false AND (cron IS NOT NULL OR fired_at IS NULL)`,
		}},
	}
}

// SQLite DDL: the same tables. Recall uses the FTS5 table memory_fts
// (porter stemming over unicode61, ranked by bm25), which holds its own copy
// of each memory's content and the memory's id, filled by a trigger and
// joined on that id. It is not an external-content table keyed by memory's
// rowid: memory has no INTEGER PRIMARY KEY, so a VACUUM may renumber its
// rowids. Rows are only soft-deleted (forgotten_at, filtered by the query);
// a memory removed by a mesh's cascade leaves an index row that joins nothing.
const sqliteMemory = `CREATE TABLE IF NOT EXISTS memory (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	content TEXT NOT NULL,
	tags TEXT DEFAULT '[]' CHECK (tags IS NULL OR json_valid(tags)),
	remembered_by TEXT REFERENCES member(id),
	remembered_by_name TEXT,
	remembered_at DATETIME NOT NULL DEFAULT {now},
	forgotten_at DATETIME
)`

const sqliteMemoryFTS = `CREATE VIRTUAL TABLE IF NOT EXISTS memory_fts USING fts5(content, memory_id UNINDEXED, tokenize='porter unicode61')`

const sqliteMemoryFTSInsert = `CREATE TRIGGER IF NOT EXISTS memory_fts_ai AFTER INSERT ON memory BEGIN
	INSERT INTO memory_fts(content, memory_id) VALUES (new.content, new.id);
END`

// Content is never changed by the broker; should something else change it,
// the index follows (a scan of memory_fts, acceptable for a rare write).
const sqliteMemoryFTSUpdate = `CREATE TRIGGER IF NOT EXISTS memory_fts_au AFTER UPDATE OF content ON memory BEGIN
	DELETE FROM memory_fts WHERE memory_id = old.id;
	INSERT INTO memory_fts(content, memory_id) VALUES (new.content, new.id);
END`

const sqliteContext = `CREATE TABLE IF NOT EXISTS context (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	presence_id TEXT REFERENCES presence(id) ON DELETE CASCADE,
	peer_name TEXT,
	summary TEXT NOT NULL,
	files_read TEXT DEFAULT '[]' CHECK (files_read IS NULL OR json_valid(files_read)),
	key_findings TEXT DEFAULT '[]' CHECK (key_findings IS NULL OR json_valid(key_findings)),
	tags TEXT DEFAULT '[]' CHECK (tags IS NULL OR json_valid(tags)),
	updated_at DATETIME NOT NULL DEFAULT {now},
	member_id TEXT REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE
)`

const sqliteTask = `CREATE TABLE IF NOT EXISTS task (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	title TEXT NOT NULL,
	assignee TEXT,
	claimed_by_name TEXT,
	claimed_by_presence TEXT REFERENCES presence(id),
	priority TEXT NOT NULL DEFAULT 'normal',
	status TEXT NOT NULL DEFAULT 'open',
	tags TEXT DEFAULT '[]' CHECK (tags IS NULL OR json_valid(tags)),
	result TEXT,
	created_by_name TEXT,
	created_at DATETIME NOT NULL DEFAULT {now},
	claimed_at DATETIME,
	completed_at DATETIME
)`

const sqliteSkill = `CREATE TABLE IF NOT EXISTS skill (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	name TEXT NOT NULL,
	description TEXT NOT NULL,
	instructions TEXT NOT NULL,
	tags TEXT DEFAULT '[]' CHECK (tags IS NULL OR json_valid(tags)),
	author_member_id TEXT REFERENCES member(id),
	author_name TEXT,
	source_type TEXT DEFAULT 'inline',
	bundle_file_id TEXT REFERENCES file(id),
	git_url TEXT,
	git_branch TEXT DEFAULT 'main',
	git_sha TEXT,
	manifest TEXT CHECK (manifest IS NULL OR json_valid(manifest)),
	created_at DATETIME NOT NULL DEFAULT {now},
	updated_at DATETIME NOT NULL DEFAULT {now}
)`

const sqliteVaultEntry = `CREATE TABLE IF NOT EXISTS vault_entry (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	member_id TEXT NOT NULL REFERENCES member(id),
	"key" TEXT NOT NULL,
	ciphertext TEXT NOT NULL,
	nonce TEXT NOT NULL,
	sealed_key TEXT NOT NULL,
	entry_type TEXT DEFAULT 'env',
	mount_path TEXT,
	description TEXT,
	created_at DATETIME NOT NULL DEFAULT {now},
	updated_at DATETIME NOT NULL DEFAULT {now}
)`

const sqliteScheduledMessage = `CREATE TABLE IF NOT EXISTS scheduled_message (
	id TEXT PRIMARY KEY NOT NULL,
	mesh_id TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE ON UPDATE CASCADE,
	presence_id TEXT,
	member_id TEXT NOT NULL REFERENCES member(id) ON DELETE CASCADE ON UPDATE CASCADE,
	"to" TEXT NOT NULL,
	message TEXT NOT NULL,
	deliver_at DATETIME,
	cron TEXT,
	subtype TEXT,
	fired_count INTEGER NOT NULL DEFAULT 0,
	cancelled BOOLEAN NOT NULL DEFAULT 0 CHECK (cancelled IN (0, 1)),
	fired_at DATETIME,
	created_at DATETIME NOT NULL DEFAULT {now}
)`

// toolboxSQLiteTables mirrors toolboxPostgresTables. The FTS5 table and its
// triggers ride as entries of their own: Bootstrap runs each create as is.
func toolboxSQLiteTables() []tableDDL {
	return []tableDDL{
		{"memory", sqliteMemory, []string{
			`CREATE INDEX IF NOT EXISTS meshbroker_memory_mesh_idx ON memory (mesh_id) WHERE forgotten_at IS NULL`,
		}},
		{"memory_fts", sqliteMemoryFTS, nil},
		{"memory_fts_ai", sqliteMemoryFTSInsert, nil},
		{"memory_fts_au", sqliteMemoryFTSUpdate, nil},
		{"context", sqliteContext, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS context_mesh_member_idx ON context (mesh_id, member_id)`,
		}},
		{"task", sqliteTask, []string{
			`CREATE INDEX IF NOT EXISTS meshbroker_task_mesh_idx ON task (mesh_id, created_at)`,
		}},
		{"skill", sqliteSkill, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS skill_mesh_name_idx ON skill (mesh_id, name)`,
		}},
		{"vault_entry", sqliteVaultEntry, []string{
			`CREATE UNIQUE INDEX IF NOT EXISTS vault_entry_mesh_member_key_idx ON vault_entry (mesh_id, member_id, "key")`,
		}},
		{"scheduled_message", sqliteScheduledMessage, []string{
			`CREATE INDEX IF NOT EXISTS meshbroker_scheduled_due_idx ON scheduled_message (deliver_at) WHERE cancelled = false AND (cron IS NOT NULL OR fired_at IS NULL)`,
			`CREATE INDEX IF NOT EXISTS meshbroker_scheduled_member_idx ON scheduled_message (mesh_id, member_id) WHERE cancelled = false AND (cron IS NOT NULL OR fired_at IS NULL)`,
		}},
	}
}
