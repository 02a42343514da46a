package models

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"gorm.io/gorm/schema"
)

// bootstrapLockKey is the Postgres advisory lock that serializes Bootstrap
// across broker processes: the ASCII bytes of "meshbrkr". It must differ from
// the reference migrator's 7473773831 so the two never wait on each other.
const bootstrapLockKey int64 = 0x6d65736862726b72

// allModels lists every model; Bootstrap checks that the database has each of
// their columns.
func allModels() []any {
	return append([]any{
		&Mesh{}, &Member{}, &Presence{}, &PendingStatus{}, &MessageQueue{},
		&AuditLog{}, &PeerState{}, &State{}, &Stream{}, &Service{},
		&Topic{}, &TopicMember{}, &TopicMessage{}, &TopicMemberKey{}, &Notification{},
		&Invite{},
	}, toolboxModels()...)
}

// ColumnRef names one column of one table (unqualified table name).
type ColumnRef struct {
	Table  string
	Column string
}

func (c ColumnRef) String() string { return c.Table + "." + c.Column }

// MissingColumnsError is Bootstrap's refusal: tables that already existed lack
// columns the models use. Nothing was created or changed.
type MissingColumnsError struct {
	Schema  string // "mesh" on Postgres, "" on SQLite
	Missing []ColumnRef
}

func (e *MissingColumnsError) Error() string {
	parts := make([]string, len(e.Missing))
	for i, c := range e.Missing {
		table := c.Table
		if e.Schema != "" {
			table = e.Schema + "." + table
		}
		parts[i] = fmt.Sprintf("%s is missing column %s", table, c.Column)
	}
	them := "it"
	if len(parts) > 1 {
		them = "them"
	}
	return fmt.Sprintf("schema: %s (meshbroker needs %s; run the reference migrations or add %s)",
		strings.Join(parts, ", "), them, them)
}

// Columns returns the missing columns as "table.column".
func (e *MissingColumnsError) Columns() []string {
	out := make([]string, len(e.Missing))
	for i, c := range e.Missing {
		out[i] = c.String()
	}
	return out
}

// Bootstrap creates whatever of meshbroker's schema is missing and checks the
// rest. It never drops or alters an existing object: on a database the
// reference migrations built, it adds only what they lack (meshbroker_schema,
// and mesh.service, which no migration creates). If an existing table lacks a
// column the models use, Bootstrap returns a *MissingColumnsError and leaves
// the database as it found it. Running it again is a no-op.
//
// Concurrent Bootstraps (several brokers starting together) are serialized:
// by an advisory lock on Postgres, by the write lock of an immediate
// transaction on SQLite.
func (db *DB) Bootstrap(ctx context.Context) error {
	sqlDB, err := db.SQLDB()
	if err != nil {
		return fmt.Errorf("bootstrap: %w", err)
	}
	tx, err := sqlDB.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("bootstrap: begin: %w", err)
	}
	// After Commit this is a no-op; on any error it undoes every CREATE.
	defer func() { _ = tx.Rollback() }()

	if db.IsPostgres() {
		err = bootstrapPostgres(ctx, tx)
	} else {
		err = bootstrapSQLite(ctx, tx)
	}
	if err != nil {
		return err
	}
	if err := db.checkColumns(ctx, tx); err != nil {
		return err
	}
	insert := `INSERT INTO ` + db.Table("meshbroker_schema") + ` (version) VALUES (` + db.placeholder(1) + `) ON CONFLICT (version) DO NOTHING`
	if _, err := tx.ExecContext(ctx, insert, SchemaVersion); err != nil {
		return fmt.Errorf("bootstrap: record version: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("bootstrap: commit: %w", err)
	}
	return nil
}

func bootstrapPostgres(ctx context.Context, tx *sql.Tx) error {
	// Transaction-scoped, so a crash or error releases it with the rollback.
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, bootstrapLockKey); err != nil {
		return fmt.Errorf("bootstrap: advisory lock: %w", err)
	}

	// Existence is checked before each CREATE, even where IF NOT EXISTS would
	// do: Postgres checks the CREATE privilege before it looks for the object,
	// so a broker role without DDL rights can still start on a complete schema.
	var exists bool
	if err := tx.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)`, pgSchema).Scan(&exists); err != nil {
		return fmt.Errorf("bootstrap: look up schema %s: %w", pgSchema, err)
	}
	if !exists {
		if _, err := tx.ExecContext(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgSchema); err != nil {
			return fmt.Errorf("bootstrap: create schema %s: %w", pgSchema, err)
		}
	}

	for _, e := range pgEnums() {
		if err := ensurePostgresEnum(ctx, tx, e); err != nil {
			return err
		}
	}

	for _, t := range postgresTables() {
		qualified := pgSchema + "." + t.name
		if err := ensurePostgresRelation(ctx, tx, qualified, t.create); err != nil {
			return fmt.Errorf("bootstrap %s: %w", qualified, err)
		}
		for _, stmt := range t.indexes {
			name, err := indexName(stmt)
			if err != nil {
				return err
			}
			if err := ensurePostgresRelation(ctx, tx, pgSchema+"."+name, stmt); err != nil {
				return fmt.Errorf("bootstrap %s index %s: %w", qualified, name, err)
			}
		}
	}
	return nil
}

// ensurePostgresRelation runs create unless a table or index called
// qualifiedName exists.
func ensurePostgresRelation(ctx context.Context, tx *sql.Tx, qualifiedName, create string) error {
	var exists bool
	if err := tx.QueryRowContext(ctx, `SELECT to_regclass($1) IS NOT NULL`, qualifiedName).Scan(&exists); err != nil {
		return fmt.Errorf("look up: %w", err)
	}
	if exists {
		return nil
	}
	if _, err := tx.ExecContext(ctx, create); err != nil {
		return fmt.Errorf("create: %w", err)
	}
	return nil
}

// ensurePostgresEnum creates mesh.<name> if missing; if it exists, it must be
// an enum with at least our labels (extra labels are fine, never removed).
func ensurePostgresEnum(ctx context.Context, tx *sql.Tx, e enumDef) error {
	qualified := pgSchema + "." + e.name
	rows, err := tx.QueryContext(ctx, `
		SELECT t.typtype::text, e.enumlabel
		FROM pg_type t
		JOIN pg_namespace n ON n.oid = t.typnamespace
		LEFT JOIN pg_enum e ON e.enumtypid = t.oid
		WHERE n.nspname = $1 AND t.typname = $2`, pgSchema, e.name)
	if err != nil {
		return fmt.Errorf("bootstrap enum %s: look up: %w", qualified, err)
	}
	defer rows.Close()
	var (
		found  bool
		isEnum bool
		labels []string
	)
	for rows.Next() {
		var typtype string
		var label sql.NullString
		if err := rows.Scan(&typtype, &label); err != nil {
			return fmt.Errorf("bootstrap enum %s: look up: %w", qualified, err)
		}
		found = true
		isEnum = typtype == "e"
		if label.Valid {
			labels = append(labels, label.String)
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("bootstrap enum %s: look up: %w", qualified, err)
	}
	// The transaction's connection must be free for the CREATE below.
	rows.Close()

	if !found {
		create := fmt.Sprintf(`CREATE TYPE %s AS ENUM (%s)`, qualified, quoteList(e.values))
		if _, err := tx.ExecContext(ctx, create); err != nil {
			return fmt.Errorf("bootstrap enum %s: create: %w", qualified, err)
		}
		return nil
	}
	if !isEnum {
		return fmt.Errorf("schema: type %s exists but is not an enum (meshbroker needs an enum of %s)", qualified, quoteList(e.values))
	}
	for _, v := range e.values {
		if !slices.Contains(labels, v) {
			return fmt.Errorf("schema: enum %s lacks value '%s' (meshbroker needs it; run the reference migrations or add it)", qualified, v)
		}
	}
	return nil
}

func bootstrapSQLite(ctx context.Context, tx *sql.Tx) error {
	for _, t := range sqliteTables() {
		if _, err := tx.ExecContext(ctx, t.create); err != nil {
			return fmt.Errorf("bootstrap %s: create: %w", t.name, err)
		}
		for _, stmt := range t.indexes {
			name, err := indexName(stmt)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, stmt); err != nil {
				return fmt.Errorf("bootstrap %s index %s: create: %w", t.name, name, err)
			}
		}
	}
	return nil
}

// requiredColumns derives, from the gorm models, the columns each table must
// have.
func requiredColumns() (map[string][]string, error) {
	// No table prefix: the lookups below use bare table names.
	naming := schema.NamingStrategy{SingularTable: true}
	cache := &sync.Map{}
	out := make(map[string][]string)
	for _, m := range allModels() {
		s, err := schema.Parse(m, cache, naming)
		if err != nil {
			return nil, fmt.Errorf("bootstrap: parse model %T: %w", m, err)
		}
		out[s.Table] = append([]string(nil), s.DBNames...)
	}
	return out, nil
}

// checkColumns verifies every model column exists, reporting all missing ones.
func (db *DB) checkColumns(ctx context.Context, tx *sql.Tx) error {
	required, err := requiredColumns()
	if err != nil {
		return err
	}
	present, err := db.existingColumns(ctx, tx, required)
	if err != nil {
		return err
	}
	tables := make([]string, 0, len(required))
	for t := range required {
		tables = append(tables, t)
	}
	slices.Sort(tables)

	missing := &MissingColumnsError{}
	if db.IsPostgres() {
		missing.Schema = pgSchema
	}
	for _, t := range tables {
		for _, c := range required[t] {
			if !present[t][c] {
				missing.Missing = append(missing.Missing, ColumnRef{Table: t, Column: c})
			}
		}
	}
	if len(missing.Missing) > 0 {
		return missing
	}
	return nil
}

// existingColumns returns table → set of column names for the given tables.
func (db *DB) existingColumns(ctx context.Context, tx *sql.Tx, tables map[string][]string) (map[string]map[string]bool, error) {
	present := make(map[string]map[string]bool)
	add := func(table, column string) {
		if present[table] == nil {
			present[table] = make(map[string]bool)
		}
		present[table][column] = true
	}

	if db.IsPostgres() {
		rows, err := tx.QueryContext(ctx,
			`SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = $1`, pgSchema)
		if err != nil {
			return nil, fmt.Errorf("bootstrap: list columns: %w", err)
		}
		defer rows.Close()
		for rows.Next() {
			var table, column string
			if err := rows.Scan(&table, &column); err != nil {
				return nil, fmt.Errorf("bootstrap: list columns: %w", err)
			}
			add(table, column)
		}
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("bootstrap: list columns: %w", err)
		}
		return present, nil
	}

	for table := range tables {
		if err := func() error {
			rows, err := tx.QueryContext(ctx, `SELECT name FROM pragma_table_info(?)`, table)
			if err != nil {
				return fmt.Errorf("bootstrap: list columns of %s: %w", table, err)
			}
			defer rows.Close()
			for rows.Next() {
				var column string
				if err := rows.Scan(&column); err != nil {
					return fmt.Errorf("bootstrap: list columns of %s: %w", table, err)
				}
				add(table, column)
			}
			if err := rows.Err(); err != nil {
				return fmt.Errorf("bootstrap: list columns of %s: %w", table, err)
			}
			return nil
		}(); err != nil {
			return nil, err
		}
	}
	return present, nil
}

// ErrSchemaNotReady is wrapped by SchemaReady when the database answers but
// Bootstrap has not recorded SchemaVersion.
var ErrSchemaNotReady = errors.New("schema not ready")

// SchemaReady reports whether the database answers and Bootstrap has recorded
// SchemaVersion; /health/ready uses it.
func (db *DB) SchemaReady(ctx context.Context) error {
	ok, err := db.HasSchemaVersion(ctx, SchemaVersion)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: version %s not recorded in %s", ErrSchemaNotReady, SchemaVersion, db.Table("meshbroker_schema"))
	}
	return nil
}

// HasSchemaVersion reports whether meshbroker_schema holds version; an
// EXPECTED_MIGRATION check can use it. A missing version table is an error.
func (db *DB) HasSchemaVersion(ctx context.Context, version string) (bool, error) {
	sqlDB, err := db.SQLDB()
	if err != nil {
		return false, err
	}
	var n int
	q := `SELECT count(*) FROM ` + db.Table("meshbroker_schema") + ` WHERE version = ` + db.placeholder(1)
	if err := sqlDB.QueryRowContext(ctx, q, version).Scan(&n); err != nil {
		return false, fmt.Errorf("schema version %s: %w", version, err)
	}
	return n > 0, nil
}

// SchemaVersions lists the schema versions recorded in meshbroker_schema,
// sorted, for messages that name what EXPECTED_MIGRATION could be.
func (db *DB) SchemaVersions(ctx context.Context) ([]string, error) {
	var versions []string
	if err := db.WithContext(ctx).Raw(`SELECT version FROM ` + db.Table("meshbroker_schema") + ` ORDER BY version`).Scan(&versions).Error; err != nil {
		return nil, fmt.Errorf("list schema versions: %w", err)
	}
	return versions, nil
}

// placeholder is the n-th bind parameter in the dialect's raw SQL, for
// statements sent through database/sql directly rather than through gorm.
func (db *DB) placeholder(n int) string {
	if db.IsPostgres() {
		return fmt.Sprintf("$%d", n)
	}
	return "?"
}
