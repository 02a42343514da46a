package models_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/models"
)

// The embedded database checkpoints its WAL on a connection of its own:
// the main connection never does (wal_autocheckpoint 0), yet rows written
// reach the database file without anyone asking, and Close leaves an empty
// WAL behind.
func TestSQLiteCheckpointsOffTheWritePath(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	db, err := models.Open(ctx, "", dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			db.Close()
		}
	}()
	var auto int
	if err := db.Raw("PRAGMA wal_autocheckpoint").Scan(&auto).Error; err != nil || auto != 0 {
		t.Fatalf("wal_autocheckpoint = %d (%v), want 0 on the main connection", auto, err)
	}
	if err := db.Exec("CREATE TABLE filler (id INTEGER PRIMARY KEY, body TEXT NOT NULL)").Error; err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, models.SQLiteFileName)
	size := func(p string) int64 {
		st, err := os.Stat(p)
		if err != nil {
			return -1
		}
		return st.Size()
	}
	before := size(file)
	body := strings.Repeat("x", 3000) // about one page per row
	for i := 0; i < 20; i++ {
		tx := db.Begin()
		for j := 0; j < 100; j++ {
			if err := tx.Exec("INSERT INTO filler (body) VALUES (?)", body).Error; err != nil {
				t.Fatal(err)
			}
		}
		if err := tx.Commit().Error; err != nil {
			t.Fatal(err)
		}
	}
	// 2,000 pages went to the WAL; the checkpointer copies them back.
	deadline := time.Now().Add(30 * time.Second)
	for size(file) < before+2000*3000 {
		if time.Now().After(deadline) {
			t.Fatalf("database file %d bytes after 30 s (was %d): the WAL was not checkpointed", size(file), before)
		}
		time.Sleep(20 * time.Millisecond) // polling a file size: no event to wait on
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	if s := size(file + "-wal"); s > 0 {
		t.Fatalf("WAL holds %d bytes after Close, want it truncated", s)
	}
}

// SQLITE_SYNCHRONOUS reaches the connection.
func TestSQLiteSynchronousOption(t *testing.T) {
	for opt, want := range map[string]int{"": 1, "NORMAL": 1, "full": 2} {
		db, err := models.OpenWith(context.Background(), "", t.TempDir(), nil, models.Options{SQLiteSynchronous: opt})
		if err != nil {
			t.Fatal(err)
		}
		var got int
		if err := db.Raw("PRAGMA synchronous").Scan(&got).Error; err != nil || got != want {
			t.Errorf("synchronous %q: %d (%v), want %d", opt, got, err, want)
		}
		db.Close()
	}
	if _, err := models.OpenWith(context.Background(), "", t.TempDir(), nil, models.Options{SQLiteSynchronous: "OFF"}); err == nil {
		t.Error("synchronous OFF accepted")
	}
}
