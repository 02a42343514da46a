package models

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// WAL checkpoints of the embedded database, off the write path.
//
// SQLite's automatic checkpoint runs inside the commit that crosses
// wal_autocheckpoint pages, on the committing connection. The broker has
// one connection, so every few thousand rows a send's commit also copied
// the WAL into the database file and fdatasync'ed it while every other
// statement queued behind it: at a paced 2,000 msg/s that was most of the
// end-to-end p99 (a trace showed fdatasync as 60 % of the broker's syscall
// time, all of it under QueueService.commit and AuditService.appendTx).
//
// Instead the main connection has wal_autocheckpoint off and this
// goroutine checkpoints on a connection of its own: PASSIVE every
// checkpointEvery, which copies and syncs without taking any lock a
// writer waits for. The WAL restarts from its beginning only when a
// writer finds every frame copied back; under sustained writes one pass
// never gets there (frames arrive while it copies), and a WAL that keeps
// growing makes every page read slower (SQLite looks pages up in one
// hash table per 4,096 frames). So while the WAL holds more than
// checkpointCatchUpFrames and is not fully copied, up to
// checkpointMaxPasses passes follow each other at once: each has less to
// copy than the one before, and one that finishes between two commits lets
// the WAL restart. (Up to 200 passes a tick, each with its fdatasync, gave
// a worse tail than 3 in back-to-back pairs at a paced 2,000 msg/s: p99
// 266 against 55 ms, and 12.3 against 10.5 ms on a quiet machine.) A RESTART checkpoint would get there in
// one step, but it blocks writers while it runs: measured at a paced
// 2,000 msg/s it held them up to 800 ms. journal_size_limit then trims
// the file at the restart.
//
// Concurrency: one goroutine owns its connection; stop ends it and waits.
// A failed checkpoint is logged and retried at the next tick: the WAL only
// grows meanwhile, nothing is lost.
type checkpointer struct {
	conn    *sql.DB
	log     *slog.Logger
	stop    chan struct{}
	done    chan struct{}
	stopped sync.Once
}

const (
	checkpointEvery         = 100 * time.Millisecond
	checkpointCatchUpFrames = 1024 // 4 MiB of 4 KiB pages
	checkpointMaxPasses     = 3    // back-to-back passes per tick
)

func startCheckpointer(conn *sql.DB, log *slog.Logger) *checkpointer {
	c := &checkpointer{conn: conn, log: log.With("svc", "db"), stop: make(chan struct{}), done: make(chan struct{})}
	go c.run()
	return c
}

func (c *checkpointer) run() {
	defer close(c.done)
	t := time.NewTicker(checkpointEvery)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		for pass := 0; pass < checkpointMaxPasses; pass++ {
			frames, copied, err := c.checkpoint("PASSIVE")
			if err != nil {
				c.log.Warn("wal checkpoint", "err", err)
				break
			}
			if frames <= checkpointCatchUpFrames || copied >= frames {
				break
			}
			select {
			case <-c.stop:
				return
			default:
			}
		}
	}
}

// checkpoint runs one checkpoint and returns the WAL's size in frames and
// how many of them are copied back.
func (c *checkpointer) checkpoint(mode string) (frames, copied int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var busy int
	if err := c.conn.QueryRowContext(ctx, "PRAGMA wal_checkpoint("+mode+")").Scan(&busy, &frames, &copied); err != nil {
		return 0, 0, fmt.Errorf("%s: %w", mode, err)
	}
	return frames, copied, nil
}

// close stops the goroutine, runs a last full checkpoint so the file is
// self-contained, and closes the connection.
func (c *checkpointer) close() error {
	var err error
	c.stopped.Do(func() {
		close(c.stop)
		<-c.done
		_, _, _ = c.checkpoint("TRUNCATE")
		err = c.conn.Close()
	})
	return err
}
