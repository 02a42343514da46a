package main

import (
	"encoding/base64"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/internal/brokerproc"
)

// Schedules due at one moment survive a kill -9 around that moment: after
// the restart each has fired exactly once and its message is queued once,
// and further kills and restarts fire nothing again.
func TestScheduleFiresOnceAcrossKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	t.Parallel() // its own storage, port and process
	st := brokerproc.NewStorage(t)
	b := brokerproc.New(t, brokerproc.Options{Storage: st, Env: []string{"SEND_RATE_LIMIT_PER_MIN=0"}})
	idFile := filepath.Join(st.DataDir, "ids.json")
	b.Run("demo", "--out", idFile)
	ids := loadIdentities(t, idFile)
	alice, bob := ids[0], ids[1]

	b.Start()
	a := b.Dial(alice, client.Options{})
	const n = 30
	due := time.Now().Add(3 * time.Second) // room for the 30 requests on a slow machine
	want := map[string]bool{}
	for i := range n {
		msg := fmt.Sprintf("due together %02d", i)
		want[msg] = true
		call(t, a, map[string]any{"type": "schedule", "to": bob.Pubkey(), "message": msg, "deliverAt": due.UnixMilli()})
	}
	// Kill it just as they fall due: some, all or none may have fired.
	time.Sleep(time.Until(due) + 20*time.Millisecond)
	b.Kill()

	db := st.Open(t)
	count := func(q string, args ...any) int64 {
		t.Helper()
		var v int64
		if err := db.Raw(q, args...).Scan(&v).Error; err != nil {
			t.Fatal(err)
		}
		return v
	}
	firedOnce := func() bool {
		return count(`SELECT count(*) FROM `+db.Table("scheduled_message")+` WHERE member_id = ? AND fired_count = 1 AND fired_at IS NOT NULL`, alice.MemberID) == n
	}
	checkQueue := func() {
		t.Helper()
		if bad := count(`SELECT count(*) FROM `+db.Table("scheduled_message")+` WHERE member_id = ? AND fired_count > 1`, alice.MemberID); bad != 0 {
			t.Fatalf("%d schedules fired more than once", bad)
		}
		for msg := range want {
			c := base64.StdEncoding.EncodeToString([]byte(msg))
			if got := count(`SELECT count(*) FROM `+db.Table("message_queue")+` WHERE ciphertext = ?`, c); got != 1 {
				t.Fatalf("%q is queued %d times, want once", msg, got)
			}
		}
	}

	b.Start()
	waitFor(t, 30*time.Second, "every schedule to fire once", firedOnce)
	checkQueue()

	bb := b.Dial(bob, client.Options{})
	got := map[string]bool{}
	for len(got) < n {
		p, body := nextMessage(t, bb)
		if got[body] || !want[body] {
			t.Fatalf("unexpected or repeated message %q (%+v)", body, p)
		}
		got[body] = true
	}

	// A push counts as received once a pong confirms it, and that mark is
	// committed within DELIVERED_FLUSH_MS (M3); before then a crash would
	// rightly push it again. Wait for the marks, so that what the restarts
	// below may bring is only a second fire.
	waitFor(t, 30*time.Second, "every push confirmed durably", func() bool {
		for msg := range want {
			c := base64.StdEncoding.EncodeToString([]byte(msg))
			if count(`SELECT count(*) FROM `+db.Table("message_queue")+` WHERE ciphertext = ? AND delivered_at IS NOT NULL`, c) != 1 {
				return false
			}
		}
		return true
	})

	// More crashes fire nothing again.
	for range 2 {
		b.Kill()
		b.Start()
		bb = b.Dial(bob, client.Options{})
		if extra := collect(bb, 500*time.Millisecond, isMessage); len(extra) != 0 {
			t.Fatalf("%d messages after a restart, want none", len(extra))
		}
	}
	checkQueue()
	if !firedOnce() {
		t.Fatal("a schedule's fire count moved after the restarts")
	}
}
