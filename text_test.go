package main

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/internal/clienttest"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// unstorable are JSON strings whose text Postgres cannot hold (H11): NUL,
// and UTF-16 surrogates that are not half of a pair.
var unstorable = []string{`"x\u0000y"`, `"x\ud800y"`, `"\udc00"`, `"\ud800\u0041"`, `"ok\ud83d"`}

// myGroups is what list_peers says about c's own groups (read from its row),
// and it orders after every frame c wrote before.
func myGroups(t *testing.T, c *client.Client) []string {
	t.Helper()
	peers, err := c.ListPeers(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range peers {
		if p.SessionID == c.Opts.SessionID {
			names := []string{}
			for _, g := range p.Groups {
				names = append(names, g.Name)
			}
			return names
		}
	}
	t.Fatal("own presence missing from list_peers")
	return nil
}

// H11: text no database can store is invalid_argument on every path and on
// both dialects, and changes nothing: frames, the send path (a rejection
// ack, never "not stored, retry"), both hellos and the hook route.
func TestNULInTextIsInvalidArgument(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	bob := b.connect(f.b, client.Options{})
	ctx := ctxT(t)

	// Valid escapes pass: a surrogate pair, an escaped backslash before u0000.
	if err := a.WriteJSON(map[string]any{"type": "join_group", "name": json.RawMessage(`"smile\ud83d\ude00"`)}); err != nil {
		t.Fatal(err)
	}
	if err := a.WriteJSON(map[string]any{"type": "join_group", "name": json.RawMessage(`"lit\\u0000"`)}); err != nil {
		t.Fatal(err)
	}
	want := []string{"smile\U0001F600", `lit\u0000`}
	if got := myGroups(t, a); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("valid escapes: groups %q, want %q", got, want)
	}

	for i, bad := range unstorable {
		raw := json.RawMessage(bad)
		for _, frame := range []map[string]any{
			{"type": "join_group", "name": raw},
			{"type": "leave_group", "name": raw},
			{"type": "set_summary", "summary": raw},
			{"type": "set_state", "key": "k", "value": map[string]any{"v": raw}},
			{"type": "set_profile", "bio": raw},
			{"type": "list_peers", "note": raw},
		} {
			_, err := a.Request(ctx, frame)
			var er *client.ErrorReply
			if !errors.As(err, &er) || er.Code != string(protocol.CodeInvalidArgument) {
				t.Fatalf("%s with %s: %v, want invalid_argument", frame["type"], bad, err)
			}
		}
		// A send gets its rejection ack: not stored, and not worth a retry.
		id := "bad-send-" + string(rune('a'+i))
		n, c := sealTo(t, f.a.Key, pub(f.b.Key), "hi")
		frame := `{"type":"send","id":"` + id + `","targetSpec":"` + f.b.Pubkey() + `","nonce":"` + n + `","ciphertext":"` + c + `","client_message_id":` + bad + `}`
		if err := a.WriteRaw([]byte(frame)); err != nil {
			t.Fatal(err)
		}
		ackFrame := waitFrame(t, a, 10*time.Second, func(f client.Frame) bool { return strings.Contains(string(f.Raw), id) })
		var ack protocol.Ack
		_ = ackFrame.Decode(&ack)
		if ackFrame.Type != "ack" || ack.Queued || !strings.HasPrefix(ack.Error, "invalid_argument: ") {
			t.Fatalf("send with %s answered %s", bad, ackFrame.Raw)
		}
	}
	if got := myGroups(t, a); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("rejected frames changed the groups: %q", got)
	}
	var n struct{ Queued, State, Summaries int64 }
	b.query(&n.Queued, "SELECT count(*) FROM {message_queue}")
	b.query(&n.State, "SELECT count(*) FROM {state}")
	b.query(&n.Summaries, "SELECT count(*) FROM {presence} WHERE summary IS NOT NULL")
	if n.Queued != 0 || n.State != 0 || n.Summaries != 0 {
		t.Fatalf("rejected frames stored something: %+v", n)
	}
	if got := collect(bob, 50*time.Millisecond, isMessage); len(got) != 0 {
		t.Fatal("a rejected send was delivered")
	}

	// Both hellos: rejected invalid_argument and closed 1008, no presence.
	sess := client.NewSession()
	for _, opts := range []client.Options{
		clienttest.Mutate(client.Options{}, func(m map[string]any) { m["displayName"] = json.RawMessage(`"c\u0000"`) }),
		clienttest.Mutate(client.Options{Session: &sess}, func(m map[string]any) { m["displayName"] = json.RawMessage(`"c\ud800"`) }),
		clienttest.Mutate(client.Options{}, func(m map[string]any) { m["cwd"] = json.RawMessage(`"/c\u0000"`) }),
	} {
		_, err := b.tryConnect(f.c, opts)
		var he *client.HandshakeError
		if !errors.As(err, &he) || he.Code != string(protocol.CodeInvalidArgument) || he.Close == nil || he.Close.Code != 1008 || he.Close.Text != "invalid_argument" {
			t.Fatalf("hello with unstorable text: %v (%+v)", err, he)
		}
	}
	var cRows int64
	b.query(&cRows, "SELECT count(*) FROM {presence} WHERE member_id = ?", f.c.MemberID)
	if cRows != 0 {
		t.Fatalf("rejected hellos left %d presence rows", cRows)
	}

	// The hook route: 400 with a JSON error, nothing parked.
	for _, bad := range unstorable {
		code, out := postHook(t, b, `{"cwd":"/nul`+strings.Trim(bad, `"`)+`","status":"working"}`)
		if msg, _ := out["error"].(string); code != 400 || out["ok"] != false || !strings.Contains(msg, "cannot be stored") {
			t.Fatalf("hook with %s: %d %v", bad, code, out)
		}
	}
	var parked int64
	b.query(&parked, "SELECT count(*) FROM {pending_status}")
	if parked != 0 {
		t.Fatalf("%d pending_status rows from rejected hooks", parked)
	}
}

// refuseGroupsLike installs a trigger that makes the database refuse any
// update of presence.groups whose JSON contains marker: a real failing
// write, on either dialect, without mocking the database.
func (b *testBroker) refuseGroupsLike(marker string) {
	b.t.Helper()
	if b.db.Dialect == models.DialectPostgres {
		b.exec(`CREATE FUNCTION refuse_groups() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN IF NEW.groups::text LIKE '%` + marker + `%' THEN RAISE EXCEPTION 'refused by test'; END IF; RETURN NEW; END $$`)
		b.exec("CREATE TRIGGER refuse_groups BEFORE UPDATE ON {presence} FOR EACH ROW EXECUTE FUNCTION refuse_groups()")
		return
	}
	b.exec("CREATE TRIGGER refuse_groups BEFORE UPDATE OF groups ON {presence} WHEN CAST(NEW.groups AS TEXT) LIKE '%" + marker + "%' BEGIN SELECT RAISE(ABORT, 'refused by test'); END")
}

// Issue 13 item 6: a join_group whose save fails leaves the in-memory group
// list as it was, so later joins and leaves on that socket still work and
// memory and row agree.
func TestJoinGroupFailureLeavesGroupsUnchanged(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	a := b.connect(f.a, client.Options{})
	if err := a.WriteJSON(map[string]any{"type": "join_group", "name": "alpha"}); err != nil {
		t.Fatal(err)
	}
	if got := myGroups(t, a); strings.Join(got, "|") != "alpha" {
		t.Fatalf("groups %q", got)
	}
	b.refuseGroupsLike("boom")
	_, err := a.Request(ctxT(t), map[string]any{"type": "join_group", "name": "boom"})
	var er *client.ErrorReply
	if !errors.As(err, &er) || er.Code != string(protocol.CodeInternal) {
		t.Fatalf("join refused by the database answered %v", err)
	}
	for _, frame := range []map[string]any{
		{"type": "join_group", "name": "beta"},
		{"type": "leave_group", "name": "alpha"},
		{"type": "join_group", "name": "gamma"},
	} {
		if err := a.WriteJSON(frame); err != nil {
			t.Fatal(err)
		}
	}
	if got := myGroups(t, a); strings.Join(got, "|") != "beta|gamma" {
		t.Fatalf("after a failed join, groups %q, want beta|gamma", got)
	}
	if got := collect(a, 50*time.Millisecond, func(f client.Frame) bool { return f.Type == "error" }); len(got) != 0 {
		t.Fatalf("later group changes failed: %s", got[0].Raw)
	}
}

// The status mirror follows the row: a set_status whose update the
// database refuses leaves the mirrored status as it was, so the hook
// route (which never touches dnd) still applies afterwards.
func TestStatusWriteFailureLeavesStatusUnchanged(t *testing.T) {
	t.Parallel()
	b := startTestBroker(t)
	f := b.fixture()
	a := b.connect(f.a, client.Options{Cwd: "/status-fail"})
	if b.db.Dialect == models.DialectPostgres {
		b.exec(`CREATE FUNCTION refuse_dnd() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN IF NEW.status = 'dnd' THEN RAISE EXCEPTION 'refused by test'; END IF; RETURN NEW; END $$`)
		b.exec("CREATE TRIGGER refuse_dnd BEFORE UPDATE ON {presence} FOR EACH ROW EXECUTE FUNCTION refuse_dnd()")
	} else {
		b.exec("CREATE TRIGGER refuse_dnd BEFORE UPDATE OF status ON {presence} WHEN NEW.status = 'dnd' BEGIN SELECT RAISE(ABORT, 'refused by test'); END")
	}
	_, err := a.Request(ctxT(t), map[string]any{"type": "set_status", "status": "dnd"})
	var er *client.ErrorReply
	if !errors.As(err, &er) || er.Code != string(protocol.CodeInternal) {
		t.Fatalf("refused set_status answered %v", err)
	}
	if code, out := postHook(t, b, `{"cwd":"/status-fail","status":"working"}`); code != 200 || out["presence_id"] != a.HelloAck.PresenceID {
		t.Fatalf("hook: %d %v", code, out)
	}
	if st, src := b.status(a.HelloAck.PresenceID); st != "working" || src != "hook" {
		t.Fatalf("after a refused dnd the hook was ignored: %s/%s", st, src)
	}
}
