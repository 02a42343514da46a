package models_test

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// schemaSnapshot lists every table, column (with type, nullability and
// default), index and constraint meshbroker's schema holds, one line each, so
// two snapshots differ exactly when something was created or altered.
func schemaSnapshot(t *testing.T, db *models.DB) []string {
	t.Helper()
	var lines []string
	var q string
	if db.IsPostgres() {
		q = `
		SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' ' || udt_name || ' null=' || is_nullable || ' default=' || coalesce(column_default, '')
		FROM information_schema.columns WHERE table_schema = 'mesh'
		UNION ALL
		SELECT 'index ' || indexname || ' ' || indexdef FROM pg_indexes WHERE schemaname = 'mesh'
		UNION ALL
		SELECT 'constraint ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(c.oid)
		FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = 'mesh'
		UNION ALL
		SELECT 'type ' || t.typname || ' ' || string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
		FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_enum e ON e.enumtypid = t.oid
		WHERE n.nspname = 'mesh' GROUP BY t.typname`
	} else {
		q = `SELECT type || ' ' || name || ' ' || coalesce(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'`
	}
	if err := db.WithContext(t.Context()).Raw(q).Scan(&lines).Error; err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	slices.Sort(lines)
	return lines
}

type versionRow struct {
	Version   string
	AppliedAt string
}

func versionRows(t *testing.T, db *models.DB) []versionRow {
	t.Helper()
	var rows []versionRow
	q := `SELECT version, CAST(applied_at AS TEXT) AS applied_at FROM ` + db.Table("meshbroker_schema") + ` ORDER BY version`
	if err := db.WithContext(t.Context()).Raw(q).Scan(&rows).Error; err != nil {
		t.Fatalf("read version table: %v", err)
	}
	return rows
}

func TestBootstrapTwiceIsNoOp(t *testing.T) {
	db := modelstest.OpenTestDB(t) // first Bootstrap
	before, versions := schemaSnapshot(t, db), versionRows(t, db)
	if len(versions) != 1 || versions[0].Version != models.SchemaVersion {
		t.Fatalf("version rows after bootstrap: %+v, want one %q", versions, models.SchemaVersion)
	}
	if err := db.Bootstrap(ctxT(t)); err != nil {
		t.Fatalf("second bootstrap: %v", err)
	}
	after := schemaSnapshot(t, db)
	if !slices.Equal(before, after) {
		t.Errorf("second bootstrap changed the schema:\n%s", diffLines(before, after))
	}
	if got := versionRows(t, db); !slices.Equal(got, versions) {
		t.Errorf("version rows changed: before %+v, after %+v", versions, got)
	}
}

// diffLines shows lines only in a (-) or only in b (+).
func diffLines(a, b []string) string {
	var out []string
	for _, l := range a {
		if !slices.Contains(b, l) {
			out = append(out, "- "+l)
		}
	}
	for _, l := range b {
		if !slices.Contains(a, l) {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

func TestBootstrapRefusesMissingColumn(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	// A table someone else created without a column we need: drop it
	// from ours and bootstrap again.
	modelstest.MustExec(t, db, `ALTER TABLE `+db.Table("presence")+` DROP COLUMN role`)
	modelstest.MustExec(t, db, `ALTER TABLE `+db.Table("message_queue")+` DROP COLUMN claim_id`)
	before := schemaSnapshot(t, db)

	err := db.Bootstrap(ctxT(t))
	var missing *models.MissingColumnsError
	if !errors.As(err, &missing) {
		t.Fatalf("bootstrap: want *MissingColumnsError, got %v", err)
	}
	if got, want := missing.Columns(), []string{"message_queue.claim_id", "presence.role"}; !slices.Equal(got, want) {
		t.Errorf("missing columns: got %v, want %v", got, want)
	}
	wantMsg := fmt.Sprintf("schema: %s is missing column claim_id, %s is missing column role (meshbroker needs them; run the reference migrations or add them)",
		db.Table("message_queue"), db.Table("presence"))
	if err.Error() != wantMsg {
		t.Errorf("message:\n got %s\nwant %s", err, wantMsg)
	}
	if after := schemaSnapshot(t, db); !slices.Equal(before, after) {
		t.Errorf("refused bootstrap changed the schema:\n%s", diffLines(before, after))
	}
}

func TestMissingColumnsErrorSingle(t *testing.T) {
	err := &models.MissingColumnsError{Schema: "mesh", Missing: []models.ColumnRef{{Table: "presence", Column: "role"}}}
	want := "schema: mesh.presence is missing column role (meshbroker needs it; run the reference migrations or add it)"
	if err.Error() != want {
		t.Errorf("got %q, want %q", err, want)
	}
}

// A table created before Bootstrap by another hand, complete apart from one
// column, is refused without creating anything else.
func TestBootstrapRefusesForeignTableAndCreatesNothing(t *testing.T) {
	db := modelstest.OpenEmptyDB(t)
	if db.IsPostgres() {
		modelstest.MustExec(t, db, `CREATE SCHEMA mesh`)
	}
	modelstest.MustExec(t, db, `CREATE TABLE `+db.Table("stream")+` (id text PRIMARY KEY, mesh_id text NOT NULL, name text NOT NULL, created_at timestamp NOT NULL)`)
	before := schemaSnapshot(t, db)

	err := db.Bootstrap(ctxT(t))
	var missing *models.MissingColumnsError
	if !errors.As(err, &missing) || !slices.Equal(missing.Columns(), []string{"stream.created_by_name"}) {
		t.Fatalf("bootstrap: want stream.created_by_name missing, got %v", err)
	}
	if after := schemaSnapshot(t, db); !slices.Equal(before, after) {
		t.Errorf("refused bootstrap left objects behind:\n%s", diffLines(before, after))
	}
	if err := db.SchemaReady(ctxT(t)); err == nil {
		t.Error("SchemaReady: want an error after a refused bootstrap")
	}
}

func TestSchemaReady(t *testing.T) {
	db := modelstest.OpenEmptyDB(t)
	if err := db.SchemaReady(ctxT(t)); err == nil {
		t.Fatal("SchemaReady on an empty database: want error")
	}
	if err := db.Bootstrap(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if err := db.SchemaReady(ctxT(t)); err != nil {
		t.Fatalf("SchemaReady after bootstrap: %v", err)
	}
	modelstest.MustExec(t, db, `DELETE FROM `+db.Table("meshbroker_schema"))
	if err := db.SchemaReady(ctxT(t)); !errors.Is(err, models.ErrSchemaNotReady) {
		t.Fatalf("SchemaReady without the version row: want ErrSchemaNotReady, got %v", err)
	}
	if ok, err := db.HasSchemaVersion(ctxT(t), "nonexistent"); err != nil || ok {
		t.Fatalf("HasSchemaVersion(nonexistent) = %v, %v", ok, err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := db.SchemaReady(t.Context()); err == nil {
		t.Fatal("SchemaReady on a closed database: want error")
	}
}

// Brokers starting together all succeed and create everything once.
func TestBootstrapConcurrent(t *testing.T) {
	db := modelstest.OpenEmptyDB(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() { errs <- db.Bootstrap(t.Context()) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("concurrent bootstrap: %v", err)
		}
	}
	if rows := versionRows(t, db); len(rows) != 1 {
		t.Errorf("version rows: %+v", rows)
	}
}

// An enum someone created with fewer values than ours is refused (Postgres
// only: SQLite has no enum types).
func TestBootstrapRefusesShortEnum(t *testing.T) {
	db := modelstest.OpenEmptyDB(t)
	if !db.IsPostgres() {
		t.Skip("enum types exist only on Postgres")
	}
	modelstest.MustExec(t, db, `CREATE SCHEMA mesh`)
	modelstest.MustExec(t, db, `CREATE TYPE mesh.presence_status AS ENUM ('idle', 'working')`)
	err := db.Bootstrap(ctxT(t))
	if err == nil || !strings.Contains(err.Error(), "enum mesh.presence_status lacks value 'dnd'") {
		t.Fatalf("bootstrap: want refusal naming the missing enum value, got %v", err)
	}
}

func TestTableNames(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	want := "presence"
	if db.IsPostgres() {
		want = "mesh.presence"
	}
	if got := db.Table("presence"); got != want {
		t.Errorf("Table(presence) = %q, want %q", got, want)
	}
	// gorm's naming strategy resolves models to the same names.
	stmt := db.DB.Model(&models.Presence{}).Statement
	if err := stmt.Parse(&models.Presence{}); err != nil {
		t.Fatal(err)
	}
	if stmt.Schema.Table != want {
		t.Errorf("gorm table for Presence = %q, want %q", stmt.Schema.Table, want)
	}
}
