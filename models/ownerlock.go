package models

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// The owner lock makes one broker process at a time the owner of a
// database's leases (meshbroker_lease). A second broker started on the same
// database waits, before it restores anything or listens, until the first
// lets go: on SQLite an exclusive flock on a file beside the database, on
// Postgres a session advisory lock held on a connection taken out of the
// pool for the process's lifetime. Both are released by the kernel or the
// server when the process dies, so a crashed owner never blocks its
// successor. Waiting is polling with a try-lock, so the wait ends with ctx.
//
// Concurrency: an OwnerLock is used by one goroutine at a time (acquired at
// start, checked by one background job, released at shutdown).

// ownerLockKey is the Postgres advisory lock key: the ASCII bytes of
// "mblease!". It differs from the bootstrap and audit keys.
const ownerLockKey int64 = 0x6d626c6561736521

// OwnerLockFileName is the file under the data dir that SQLite brokers lock.
const OwnerLockFileName = "meshbroker.owner.lock"

// ownerLockPoll is how often a waiting broker tries the lock again.
const ownerLockPoll = 100 * time.Millisecond

// OwnerLock is a held owner lock.
type OwnerLock struct {
	file *os.File // SQLite
	conn *sql.Conn
	db   *DB // Postgres: to take a new connection if the session ends
	log  *slog.Logger
	lost chan struct{} // closed when another broker took the lock
}

// AcquireOwnerLock blocks until this process owns db's leases or ctx ends.
// It logs once when it has to wait, and again when it got the lock.
func AcquireOwnerLock(ctx context.Context, db *DB, dataDir string, log *slog.Logger) (*OwnerLock, error) {
	l := &OwnerLock{log: log, lost: make(chan struct{})}
	try := l.tryFile
	if db.IsPostgres() {
		l.db = db
		sqlDB, err := db.SQLDB()
		if err != nil {
			return nil, err
		}
		if l.conn, err = sqlDB.Conn(ctx); err != nil {
			return nil, fmt.Errorf("owner lock: take a connection: %w", err)
		}
		try = l.tryAdvisory
	} else {
		f, err := os.OpenFile(filepath.Join(dataDir, OwnerLockFileName), os.O_RDWR|os.O_CREATE, 0o640)
		if err != nil {
			return nil, fmt.Errorf("owner lock: open lock file: %w", err)
		}
		l.file = f
	}
	waitedSince := time.Time{}
	for {
		ok, err := try(ctx)
		if err != nil {
			l.Release()
			return nil, err
		}
		if ok {
			if !waitedSince.IsZero() {
				log.Info("owner lock acquired: the previous broker let go", "waited_ms", time.Since(waitedSince).Milliseconds())
			}
			return l, nil
		}
		if waitedSince.IsZero() {
			waitedSince = time.Now()
			log.Warn("another broker owns this database's leases; waiting for it to stop before restoring and listening", "db", db.Dialect.String())
		}
		select {
		case <-ctx.Done():
			l.Release()
			return nil, fmt.Errorf("owner lock: waiting for the previous broker: %w", ctx.Err())
		case <-time.After(ownerLockPoll):
		}
	}
}

func (l *OwnerLock) tryFile(context.Context) (bool, error) {
	err := syscall.Flock(int(l.file.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("owner lock: flock: %w", err)
	}
	return true, nil
}

func (l *OwnerLock) tryAdvisory(ctx context.Context) (bool, error) {
	var ok bool
	if err := l.conn.QueryRowContext(ctx, "SELECT pg_try_advisory_lock($1)", ownerLockKey).Scan(&ok); err != nil {
		return false, fmt.Errorf("owner lock: advisory lock: %w", err)
	}
	return ok, nil
}

// Check confirms the lock is still held on Postgres (a server restart ends
// the session that held it). A lost lock is taken again on a new
// connection when nobody else took it meanwhile; the error says when that
// failed, and then another broker may own the leases.
func (l *OwnerLock) Check(ctx context.Context) error {
	if l == nil || l.db == nil {
		return nil
	}
	select {
	case <-l.lost:
		return errors.New("owner lock taken by another broker")
	default:
	}
	if l.conn == nil {
		return l.retake(ctx)
	}
	var held bool
	err := l.conn.QueryRowContext(ctx, "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted"+
		" AND objid = ($1::bigint & 4294967295)::oid AND classid = ($1::bigint >> 32)::oid)", ownerLockKey).Scan(&held)
	if err == nil && held {
		return nil
	}
	_ = l.conn.Close()
	l.conn = nil
	return l.retake(ctx)
}

// retake takes the lock again on a new connection after its session ended.
func (l *OwnerLock) retake(ctx context.Context) error {
	sqlDB, err := l.db.SQLDB()
	if err != nil {
		return err
	}
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		return fmt.Errorf("owner lock lost; reconnect: %w", err)
	}
	l.conn = conn
	ok, err := l.tryAdvisory(ctx)
	if err != nil {
		return fmt.Errorf("owner lock lost; retake: %w", err)
	}
	if !ok {
		close(l.lost)
		return errors.New("owner lock lost and taken by another broker")
	}
	l.log.Warn("owner lock was lost (database session ended) and is held again")
	return nil
}

// Lost is closed when Check found the lock taken by another broker: this
// process must stop serving, or peers would split across two owners.
func (l *OwnerLock) Lost() <-chan struct{} {
	if l == nil {
		return nil
	}
	return l.lost
}

// Release lets the next broker in. Safe on nil and more than once.
func (l *OwnerLock) Release() {
	if l == nil {
		return
	}
	if l.file != nil {
		_ = syscall.Flock(int(l.file.Fd()), syscall.LOCK_UN)
		_ = l.file.Close()
		l.file = nil
	}
	l.db = nil
	if l.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, _ = l.conn.ExecContext(ctx, "SELECT pg_advisory_unlock($1)", ownerLockKey)
		cancel()
		_ = l.conn.Close()
		l.conn = nil
	}
}
