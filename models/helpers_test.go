package models_test

import (
	"context"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/models"
)

// ctxT is a test-bounded context.
func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func ptr[T any](v T) *T { return &v }

// base is a mesh with two members, a topic and a message: the parents most
// rows need.
type base struct {
	mesh    models.Mesh
	alice   models.Member
	bob     models.Member
	topic   models.Topic
	message models.TopicMessage
}

func seed(t *testing.T, db *models.DB) base {
	t.Helper()
	b := base{
		mesh: models.Mesh{ID: models.NewID(), Name: "m", Slug: "m", OwnerUserID: "user-1"},
	}
	b.alice = models.Member{ID: models.NewID(), MeshID: b.mesh.ID, PeerPubkey: "aa", DisplayName: "alice"}
	b.bob = models.Member{ID: models.NewID(), MeshID: b.mesh.ID, PeerPubkey: "bb", DisplayName: "bob"}
	b.topic = models.Topic{ID: models.NewID(), MeshID: b.mesh.ID, Name: "general"}
	b.message = models.TopicMessage{ID: models.NewID(), TopicID: b.topic.ID, SenderMemberID: b.alice.ID, Nonce: "n", Ciphertext: "c"}
	for _, row := range []any{&b.mesh, &b.alice, &b.bob, &b.topic, &b.message} {
		mustCreate(t, db, row)
	}
	return b
}

func mustCreate(t *testing.T, db *models.DB, row any) {
	t.Helper()
	if err := db.WithContext(t.Context()).Create(row).Error; err != nil {
		t.Fatalf("create %T: %v", row, err)
	}
}

// sameJSON compares two JSON texts by meaning: jsonb reorders keys and
// rewrites whitespace.
func sameJSON(t *testing.T, a, b models.JSON) bool {
	t.Helper()
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	var va, vb any
	if err := json.Unmarshal(a, &va); err != nil {
		t.Fatalf("unmarshal %s: %v", a, err)
	}
	if err := json.Unmarshal(b, &vb); err != nil {
		t.Fatalf("unmarshal %s: %v", b, err)
	}
	return reflect.DeepEqual(va, vb)
}

var (
	timeType     = reflect.TypeFor[time.Time]()
	timePtrType  = reflect.TypeFor[*time.Time]()
	jsonDataType = reflect.TypeFor[models.JSON]()
)

// assertSameRow compares two rows of one model field by field: times as
// instants at microsecond precision and in UTC, JSON by meaning, the rest
// exactly.
func assertSameRow(t *testing.T, want, got any) {
	t.Helper()
	wv, gv := reflect.Indirect(reflect.ValueOf(want)), reflect.Indirect(reflect.ValueOf(got))
	typ := wv.Type()
	for i := range typ.NumField() {
		name := typ.Name() + "." + typ.Field(i).Name
		w, g := wv.Field(i), gv.Field(i)
		switch typ.Field(i).Type {
		case timeType:
			assertSameTime(t, name, w.Interface().(time.Time), g.Interface().(time.Time))
		case timePtrType:
			wp, gp := w.Interface().(*time.Time), g.Interface().(*time.Time)
			if (wp == nil) != (gp == nil) {
				t.Errorf("%s: want %v, got %v", name, wp, gp)
			} else if wp != nil {
				assertSameTime(t, name, *wp, *gp)
			}
		case jsonDataType:
			if !sameJSON(t, w.Interface().(models.JSON), g.Interface().(models.JSON)) {
				t.Errorf("%s: want %s, got %s", name, w.Interface(), g.Interface())
			}
		default:
			if !reflect.DeepEqual(w.Interface(), g.Interface()) {
				t.Errorf("%s: want %#v, got %#v", name, deref(w), deref(g))
			}
		}
	}
}

func assertSameTime(t *testing.T, name string, want, got time.Time) {
	t.Helper()
	if got.Location() != time.UTC {
		t.Errorf("%s: scanned in %v, want UTC", name, got.Location())
	}
	if !got.Equal(want.Truncate(time.Microsecond)) {
		t.Errorf("%s: want %v, got %v", name, want.UTC().Truncate(time.Microsecond), got)
	}
}

func deref(v reflect.Value) any {
	if v.Kind() == reflect.Pointer && !v.IsNil() {
		return v.Elem().Interface()
	}
	return v.Interface()
}

// assertNoZeroField fails if a field of row is its zero value, so a round
// trip really covers every column (including ones added later).
func assertNoZeroField(t *testing.T, row any) {
	t.Helper()
	v := reflect.Indirect(reflect.ValueOf(row))
	for i := range v.NumField() {
		if v.Field(i).IsZero() {
			t.Errorf("%s.%s is not set in the fixture", v.Type().Name(), v.Type().Field(i).Name)
		}
	}
}
