package models_test

import (
	"database/sql"
	"math/rand/v2"
	"regexp"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// ORDER BY and comparisons on timestamp columns are chronological, whatever
// zone the Go times were in and whether the database default wrote them.
func TestTimestampOrderIsChronological(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	b := seed(t, db)

	base := time.Date(2026, 5, 5, 10, 0, 0, 0, time.UTC)
	east, west := time.FixedZone("E", 9*3600), time.FixedZone("W", -7*3600)
	instants := []time.Time{
		base,
		base.Add(time.Microsecond),
		base.Add(123456 * time.Microsecond),
		base.Add(500 * time.Millisecond),
		base.Add(999999 * time.Microsecond),
		base.Add(time.Second),
		base.Add(10 * time.Second),
		base.Add(time.Hour),
		base.Add(24 * time.Hour),
	}
	zones := []*time.Location{time.UTC, east, west}
	ids := make(map[string]int) // id → index in instants
	for _, i := range rand.Perm(len(instants)) {
		q := &models.MessageQueue{
			ID: models.NewID(), MeshID: b.mesh.ID, SenderMemberID: b.alice.ID, TargetSpec: "*", Nonce: "n", Ciphertext: "c",
			CreatedAt: instants[i].In(zones[i%len(zones)]),
		}
		mustCreate(t, db, q)
		ids[q.ID] = i
	}

	var rows []models.MessageQueue
	if err := db.WithContext(t.Context()).Order("created_at").Find(&rows).Error; err != nil {
		t.Fatal(err)
	}
	for n, r := range rows {
		if ids[r.ID] != n {
			t.Fatalf("ORDER BY created_at: position %d holds instant %d", n, ids[r.ID])
		}
		if !r.CreatedAt.Equal(instants[n]) || r.CreatedAt.Location() != time.UTC {
			t.Errorf("row %d: created_at %v, want %v in UTC", n, r.CreatedAt, instants[n])
		}
	}

	// A bound parameter in another zone compares as the same instant.
	var n int64
	cutoff := base.Add(time.Second).In(east)
	if err := db.WithContext(t.Context()).Model(&models.MessageQueue{}).Where("created_at < ?", cutoff).Count(&n).Error; err != nil {
		t.Fatal(err)
	}
	if n != 5 {
		t.Errorf("created_at < %v: %d rows, want 5", cutoff, n)
	}
}

// SQLite stores every timestamp, from Go or from a column default, as
// fixed-width UTC text.
func TestSQLiteTimeStorageFormat(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	if db.IsPostgres() {
		t.Skip("storage format is SQLite's")
	}
	b := seed(t, db)
	withTime := &models.MessageQueue{
		ID: models.NewID(), MeshID: b.mesh.ID, SenderMemberID: b.alice.ID, TargetSpec: "*", Nonce: "n", Ciphertext: "c",
		CreatedAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("X", 3600)),
	}
	withDefault := &models.MessageQueue{ID: models.NewID(), MeshID: b.mesh.ID, SenderMemberID: b.alice.ID, TargetSpec: "*", Nonce: "n", Ciphertext: "c"}
	mustCreate(t, db, withTime)
	mustCreate(t, db, withDefault)

	var raw []string
	if err := db.WithContext(t.Context()).Raw(`SELECT created_at || '' FROM message_queue ORDER BY created_at`).Scan(&raw).Error; err != nil {
		t.Fatal(err)
	}
	layout := regexp.MustCompile(`^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$`)
	for _, s := range raw {
		if !layout.MatchString(s) {
			t.Errorf("stored time %q does not match %s", s, models.SQLiteTimeLayout)
		}
	}
	if raw[0] != "2026-01-02 02:04:05.000000" {
		t.Errorf("stored %q, want the UTC instant 2026-01-02 02:04:05.000000", raw[0])
	}
	got, err := models.ParseSQLiteTime(raw[1])
	if err != nil || got.Location() != time.UTC {
		t.Fatalf("ParseSQLiteTime(%q) = %v, %v", raw[1], got, err)
	}
	if d := time.Since(got); d < 0 || d > time.Minute {
		t.Errorf("default created_at %v is not about now", got)
	}
}

// The database default now() writes UTC even when the database's own
// timezone setting is not UTC: Open pins the session time zone.
func TestPostgresDefaultNowIsUTC(t *testing.T) {
	url := modelstest.FreshPostgresURL(t)
	plain, err := sql.Open("pgx", url)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	var name string
	if err := plain.QueryRowContext(t.Context(), `SELECT current_database()`).Scan(&name); err != nil {
		t.Fatal(err)
	}
	if _, err := plain.ExecContext(t.Context(), `ALTER DATABASE `+name+` SET timezone = 'Asia/Tokyo'`); err != nil {
		t.Fatal(err)
	}
	plain.Close()

	db := modelstest.Open(t, url)
	if err := db.Bootstrap(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	var tz string
	if err := db.WithContext(t.Context()).Raw(`SHOW timezone`).Scan(&tz).Error; err != nil || tz != "UTC" {
		t.Fatalf("session timezone = %q, %v; want UTC", tz, err)
	}
	b := seed(t, db)
	var got models.Mesh
	if err := db.WithContext(t.Context()).Take(&got, "id = ?", b.mesh.ID).Error; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(got.CreatedAt); d < -time.Minute || d > time.Minute {
		t.Errorf("default created_at %v is %v away from now: stored in the wrong zone", got.CreatedAt, d)
	}
	if got.CreatedAt.Location() != time.UTC {
		t.Errorf("created_at scanned in %v", got.CreatedAt.Location())
	}
}
