package models_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/models/modelstest"
)

// ownLocks selects the owner lock (key "mblease!") in this test's database.
const ownLocks = "locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())" +
	" AND classid = x'6d626c65'::int::oid AND objid = x'61736521'::int::oid AND pid <> pg_backend_pid()"

// logSink is a slog handler that hands every message to a channel.
type logSink struct{ msgs chan string }

func (s *logSink) Enabled(context.Context, slog.Level) bool { return true }
func (s *logSink) Handle(_ context.Context, r slog.Record) error {
	s.msgs <- r.Message
	return nil
}
func (s *logSink) WithAttrs([]slog.Attr) slog.Handler { return s }
func (s *logSink) WithGroup(string) slog.Handler      { return s }

// Two brokers on one database: the second waits, says so, and gets the lock
// when the first lets go; a wait ends with its context.
func TestOwnerLockOneOwnerAtATime(t *testing.T) {
	dir := t.TempDir()
	url := ""
	if os.Getenv(modelstest.EnvDatabaseURL) != "" {
		url = modelstest.FreshPostgresURL(t)
	}
	open := func() *models.DB {
		db, err := models.Open(ctxT(t), url, dir, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	}
	first, second := open(), open()
	quiet := slog.New(slog.DiscardHandler)
	l1, err := models.AcquireOwnerLock(ctxT(t), first, dir, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if err := l1.Check(ctxT(t)); err != nil {
		t.Fatalf("check of a held lock: %v", err)
	}

	sink := &logSink{msgs: make(chan string, 16)}
	got := make(chan *models.OwnerLock, 1)
	go func() {
		l2, err := models.AcquireOwnerLock(context.Background(), second, dir, slog.New(sink))
		if err != nil {
			t.Error(err)
		}
		got <- l2
	}()
	select {
	case msg := <-sink.msgs:
		if !strings.Contains(msg, "another broker owns") {
			t.Fatalf("first log line of the waiter: %q", msg)
		}
	case l2 := <-got:
		l2.Release()
		t.Fatal("second owner got the lock while the first held it")
	case <-time.After(20 * time.Second):
		t.Fatal("the waiter never said it waits")
	}
	// A third attempt gives up with its context.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := models.AcquireOwnerLock(ctx, open(), dir, quiet); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("third attempt: %v", err)
	}

	l1.Release()
	select {
	case l2 := <-got:
		if err := l2.Check(ctxT(t)); err != nil {
			t.Fatalf("check of the handed-over lock: %v", err)
		}
		if first.IsPostgres() {
			// A database restart ends the holder's session: Check takes the
			// lock again on a new connection.
			// Only this test's database and key: pg_locks lists the whole
			// cluster, which other tests share.
			if err := first.Exec("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE " + ownLocks).Error; err != nil {
				t.Fatal(err)
			}
			if err := l2.Check(ctxT(t)); err != nil {
				t.Fatalf("check after the session ended: %v", err)
			}
			var n int64
			first.Raw("SELECT count(*) FROM pg_locks WHERE " + ownLocks).Scan(&n)
			if n != 1 {
				t.Fatalf("%d advisory locks held after the retake, want 1", n)
			}
			// If a waiting broker gets in first, the lock is lost for good
			// and Lost tells the holder to stop serving.
			sink3 := &logSink{msgs: make(chan string, 16)}
			got3 := make(chan *models.OwnerLock, 1)
			go func() {
				l3, err := models.AcquireOwnerLock(context.Background(), open(), dir, slog.New(sink3))
				if err != nil {
					t.Error(err)
				}
				got3 <- l3
			}()
			<-sink3.msgs // it waits
			if err := first.Exec("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE " + ownLocks).Error; err != nil {
				t.Fatal(err)
			}
			var l3 *models.OwnerLock
			select {
			case l3 = <-got3:
			case <-time.After(20 * time.Second):
				t.Fatal("the waiter did not get the lock of the ended session")
			}
			defer l3.Release()
			if err := l2.Check(ctxT(t)); err == nil {
				t.Fatal("Check passed with the lock held by another broker")
			}
			select {
			case <-l2.Lost():
			default:
				t.Fatal("Lost not closed")
			}
		}
		l2.Release()
	case <-time.After(20 * time.Second):
		t.Fatal("the waiter did not get the released lock")
	}
}
