package models_test

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/claudemesh/meshbroker/models/modelstest"
)

// EnvRefMigrations names a directory holding the reference's SQL migrations
// (packages/db/migrations/*.sql of alezmad/claudemesh at 9d1b4f3), e.g.
//
//	mkdir -p /tmp/ref && for f in $(git -C <mirror> ls-tree -r --name-only 9d1b4f3 packages/db/migrations); do
//	  git -C <mirror> show 9d1b4f3:$f > /tmp/ref/$(basename $f); done
//
// They are not vendored here: they are the reference's code, not ours.
const envRefMigrations = "MESHBROKER_REF_MIGRATIONS"

// Bootstrap on a database the reference migrations built changes nothing
// that exists, adds only meshbroker's own tables and indexes, mesh.service
// and the toolbox's mesh.skill, mesh.vault_entry and mesh.scheduled_message
// (which no migration creates), and the models
// then read and write every column there, with the reference's defaults.
func TestBootstrapOnReferenceMigratedDatabase(t *testing.T) {
	dir := os.Getenv(envRefMigrations)
	if dir == "" {
		t.Skipf("%s is not set", envRefMigrations)
	}
	url := modelstest.FreshPostgresURL(t)
	applyReferenceMigrations(t, url, dir)

	db := modelstest.Open(t, url)
	before := schemaSnapshot(t, db)
	if err := db.Bootstrap(ctxT(t)); err != nil {
		t.Fatalf("bootstrap on the reference schema: %v", err)
	}
	after := schemaSnapshot(t, db)
	t.Logf("reference schema: %d objects; after bootstrap: %d", len(before), len(after))
	for _, line := range before {
		if !slices.Contains(after, line) {
			t.Errorf("bootstrap altered or dropped: %s", line)
		}
	}
	// The toolbox's skill, vault_entry and scheduled_message come from
	// mesh.ts and the reference broker, not from a migration.
	bootstrapOwn := regexp.MustCompile(`\b(mesh\.)?(service|skill|vault_entry|scheduled_message|meshbroker_\w+)\b|\b(service|skill|vault_entry|scheduled_message)_`)
	for _, line := range after {
		if slices.Contains(before, line) {
			continue
		}
		if !bootstrapOwn.MatchString(line) {
			t.Errorf("bootstrap added something unexpected: %s", line)
		} else {
			t.Logf("added: %s", line)
		}
	}
	if err := db.Bootstrap(ctxT(t)); err != nil {
		t.Fatalf("second bootstrap: %v", err)
	}
	if again := schemaSnapshot(t, db); !slices.Equal(after, again) {
		t.Errorf("second bootstrap changed the schema:\n%s", diffLines(after, again))
	}

	// An empty database bootstrapped by meshbroker has, table for table, the
	// same columns, types, defaults, indexes, constraints and enums as the
	// reference's; only the foreign keys into the web app's user table are
	// left out (that table is not ours).
	fresh := modelstest.OpenTestDB(t)
	ours := schemaSnapshot(t, fresh)
	theirs := restrictToTablesOf(after, ours)
	wantMissing := []string{
		"constraint mesh.member member_user_id_user_id_fk FOREIGN KEY (user_id) REFERENCES \"user\"(id) ON UPDATE CASCADE ON DELETE SET NULL",
		"constraint mesh.mesh mesh_owner_user_id_user_id_fk FOREIGN KEY (owner_user_id) REFERENCES \"user\"(id) ON UPDATE CASCADE ON DELETE CASCADE",
	}
	if diff := diffLines(theirs, ours); diff != "- "+strings.Join(wantMissing, "\n- ") {
		t.Errorf("empty-database bootstrap differs from the reference schema (- reference only, + ours only):\n%s", diff)
	}

	// mesh.owner_user_id and member.user_id reference the web app's users here.
	modelstest.MustExec(t, db, `INSERT INTO public."user" (id, name, email) VALUES ('user-1', 'one', 'one@example.test'), ('user-2', 'two', 'two@example.test')`)
	t.Run("round trip", func(t *testing.T) { roundTripEveryColumn(t, db) })
	t.Run("defaults", func(t *testing.T) { defaultsAndNulls(t, db) })
}

// applyReferenceMigrations runs the migration files in order, each as one
// implicit transaction like the reference migrator. Without pgvector on the
// server, the vector column types and HNSW indexes (pdf schema only, nothing
// meshbroker touches) are replaced so the rest can run.
func applyReferenceMigrations(t *testing.T, url, dir string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.sql"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no *.sql in %s (%v)", dir, err)
	}
	slices.Sort(files)
	conn, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(t.Context())

	var haveVector bool
	if err := conn.QueryRow(t.Context(), `SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')`).Scan(&haveVector); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		body, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		sql := string(body)
		if !haveVector {
			sql = stripPgvector(sql)
		}
		if _, err := conn.PgConn().Exec(t.Context(), sql).ReadAll(); err != nil {
			t.Fatalf("apply %s: %v", filepath.Base(f), err)
		}
	}
}

func stripPgvector(sql string) string {
	sql = strings.ReplaceAll(sql, "CREATE EXTENSION IF NOT EXISTS vector;", "")
	sql = strings.ReplaceAll(sql, "vector(1536)", "real[]")
	lines := strings.Split(sql, "\n")
	lines = slices.DeleteFunc(lines, func(l string) bool { return strings.Contains(l, "USING hnsw") })
	return strings.Join(lines, "\n")
}

var (
	snapshotTableRE = regexp.MustCompile(`^(?:column (\w+)\.|constraint mesh\.(\w+) |index \w+ .* ON mesh\.(\w+) )`)
	snapshotTypeRE  = regexp.MustCompile(`^type (\w+) `)
)

// restrictToTablesOf keeps the lines of a reference snapshot that describe a
// table or enum type present in ours.
func restrictToTablesOf(reference, ours []string) []string {
	tables, types := map[string]bool{}, map[string]bool{}
	key := func(line string) (string, bool, bool) {
		if m := snapshotTableRE.FindStringSubmatch(line); m != nil {
			return m[1] + m[2] + m[3], true, false
		}
		if m := snapshotTypeRE.FindStringSubmatch(line); m != nil {
			return m[1], false, true
		}
		return "", false, false
	}
	for _, l := range ours {
		if k, isTable, isType := key(l); isTable {
			tables[k] = true
		} else if isType {
			types[k] = true
		}
	}
	var out []string
	for _, l := range reference {
		if k, isTable, isType := key(l); (isTable && tables[k]) || (isType && types[k]) {
			out = append(out, l)
		}
	}
	return out
}
