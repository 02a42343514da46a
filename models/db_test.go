package models_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

func TestOpenRejectsUnknownScheme(t *testing.T) {
	_, err := models.Open(context.Background(), "mysql://user:secret@host/db", t.TempDir(), nil)
	if err == nil {
		t.Fatal("want an error")
	}
	if strings.Contains(err.Error(), "secret") {
		t.Errorf("error leaks the URL: %v", err)
	}
}

func TestOpenSQLiteCreatesDataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	db, err := models.Open(context.Background(), "", dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := os.Stat(filepath.Join(dir, models.SQLiteFileName)); err != nil {
		t.Fatalf("database file: %v", err)
	}
	if db.Dialect != models.DialectSQLite || db.IsPostgres() {
		t.Errorf("dialect %v", db.Dialect)
	}
	for pragma, want := range map[string]string{"journal_mode": "wal", "foreign_keys": "1", "busy_timeout": "10000"} {
		var got string
		if err := db.Raw("PRAGMA " + pragma).Scan(&got).Error; err != nil {
			t.Fatal(err)
		}
		if !strings.EqualFold(got, want) {
			t.Errorf("PRAGMA %s = %s, want %s", pragma, got, want)
		}
	}
	if err := db.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// Many goroutines writing at once never see SQLITE_BUSY (or pool trouble on
// Postgres).
func TestConcurrentWriters(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	b := seed(t, db)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 25 {
				err := db.WithContext(t.Context()).Create(&models.MessageQueue{
					ID: models.NewID(), MeshID: b.mesh.ID, SenderMemberID: b.alice.ID, TargetSpec: "*", Nonce: "n", Ciphertext: "c",
				}).Error
				if err != nil {
					t.Errorf("writer %d insert %d: %v", g, i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	var n int64
	if err := db.WithContext(t.Context()).Model(&models.MessageQueue{}).Count(&n).Error; err != nil || n != 200 {
		t.Errorf("rows: %d, %v; want 200", n, err)
	}
}

func TestDialectString(t *testing.T) {
	for d, want := range map[models.Dialect]string{models.DialectPostgres: "postgres", models.DialectSQLite: "sqlite", 0: "Dialect(0)"} {
		if got := d.String(); got != want {
			t.Errorf("%d: %q, want %q", int(d), got, want)
		}
	}
}

// Queries name their columns: a column added to a shared table later must not
// change the shape of a prepared statement's result.
func TestQueriesNameColumns(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	sql := db.ToSQL(func(tx *gorm.DB) *gorm.DB { return tx.Take(&models.Presence{}, "id = ?", "x") })
	if strings.Contains(sql, "*") || !strings.Contains(sql, "disconnected_at") {
		t.Errorf("query does not list columns: %s", sql)
	}
}
