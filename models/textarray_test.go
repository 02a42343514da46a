package models_test

import (
	"context"
	"testing"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// Elements that need escaping come back from Postgres exactly as sent, in
// order, with NULLs in place.
func TestTextArrayRoundTrip(t *testing.T) {
	db := modelstest.OpenTestDB(t)
	if !db.IsPostgres() {
		t.Skip("text[] is Postgres only; set TEST_DATABASE_URL")
	}
	str := func(s string) *string { return &s }
	in := models.TextArray{str(`plain`), nil, str(`"quoted"`), str(`back\slash`), str(`{braces},comma`), str(""), str("NULL"), str(`{"k":"v\"w"}`), str("tab\tnew\nline ünï")}
	var rows []struct {
		V   *string
		Ord int
	}
	err := db.WithContext(context.Background()).Raw("SELECT v, ord FROM unnest(?::text[]) WITH ORDINALITY AS u(v, ord) ORDER BY ord", in).Scan(&rows).Error
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != len(in) {
		t.Fatalf("%d rows, want %d", len(rows), len(in))
	}
	for i, r := range rows {
		switch {
		case in[i] == nil && r.V != nil:
			t.Errorf("element %d = %q, want NULL", i, *r.V)
		case in[i] != nil && (r.V == nil || *r.V != *in[i]):
			t.Errorf("element %d = %v, want %q", i, r.V, *in[i])
		}
	}
}
