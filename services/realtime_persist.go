package services

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
)

// The extras follow their lease across a restart (issue 16): URL watches,
// stream subscriptions, MCP registry entries and the mesh clock are
// written to meshbroker_realtime, one row per watch, subscription, entry
// and clock, and loaded back by RestoreState after presence restored its
// leases. What stays in memory only: MCP calls in flight (their caller's
// socket is gone after a restart, so a reply has nowhere to go; the caller
// retries) and a watch check in flight (the restored watch checks again on
// its next tick).
//
// Writes are per mesh and batched: a change marks its mesh dirty under mu,
// and flushState (every cfg.LeaseFlush, and once more in Close) rewrites
// the rows of the dirty meshes in one transaction. No extra write happens
// on a hot path. Clock ticks do not mark a mesh dirty; the tick count is
// written with the mesh's next change and at shutdown, so after kill -9 a
// running clock resumes from the tick it had at its last write.
//
// Concurrency: dirty is guarded by mu like the tables it describes;
// flushState copies rows under mu and writes after Unlock, serialized by
// the one flush loop (and by Close, which runs after that loop ended).

// realtimeRow is one row of meshbroker_realtime.
type realtimeRow struct {
	MeshID     string
	Kind       string
	Key        string
	PresenceID *string
	Body       models.JSON
}

// Row kinds.
const (
	rowWatch = "watch"
	rowSub   = "subscription"
	rowMCP   = "mcp"
	rowClock = "clock"
)

type watchRecord struct {
	ID, MemberID, URL, Mode, Extract, NotifyOn string
	Interval                                   float64
	Headers                                    map[string]string `json:",omitempty"`
	Label                                      *string           `json:",omitempty"`
	CreatedAt                                  time.Time
	LastHash, LastValue                        string
	LastCheck                                  time.Time
}

type mcpRecord struct {
	Name, Description, HostedBy, MemberID string
	Tools                                 []MCPToolSpec
	Persistent, Online                    bool
	RegisteredAt, OfflineSince            time.Time
}

type clockRecord struct {
	Speed              float64
	Paused             bool
	Tick               int64
	SimTime, StartedAt time.Time
}

// markDirtyLocked schedules the mesh's rows for the next flush. mu must be held.
func (r *Realtime) markDirtyLocked(meshID string) { r.dirty[meshID] = struct{}{} }

// runFlushLoop writes dirty meshes every cfg.LeaseFlush until Close.
func (r *Realtime) runFlushLoop(every time.Duration) {
	defer r.flushWG.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
			if err := r.flushState(r.ctx); err != nil && r.ctx.Err() == nil {
				r.log.Error("persist realtime state", "err", err)
			}
		}
	}
}

// flushState rewrites the rows of every dirty mesh. A failed write marks
// them dirty again.
func (r *Realtime) flushState(ctx context.Context) error {
	r.mu.Lock()
	if len(r.dirty) == 0 {
		r.mu.Unlock()
		return nil
	}
	meshes := make([]string, 0, len(r.dirty))
	for m := range r.dirty {
		meshes = append(meshes, m)
	}
	clear(r.dirty)
	rows := r.rowsLocked(meshes)
	r.mu.Unlock()
	if err := r.writeRows(ctx, meshes, rows); err != nil {
		r.mu.Lock()
		for _, m := range meshes {
			r.markDirtyLocked(m)
		}
		r.mu.Unlock()
		return err
	}
	return nil
}

// rowsLocked renders the state of the given meshes. mu must be held.
func (r *Realtime) rowsLocked(meshes []string) []realtimeRow {
	want := make(map[string]bool, len(meshes))
	for _, m := range meshes {
		want[m] = true
	}
	var rows []realtimeRow
	add := func(meshID, kind, key, presenceID string, v any) {
		body, _ := json.Marshal(v)
		row := realtimeRow{MeshID: meshID, Kind: kind, Key: key, Body: models.JSON(body)}
		if presenceID != "" {
			row.PresenceID = &presenceID
		}
		rows = append(rows, row)
	}
	for _, w := range r.watches {
		if want[w.meshID] { // stopped by Close too, which writes them last
			add(w.meshID, rowWatch, w.id, w.presenceID, watchRecord{
				ID: w.id, MemberID: w.memberID, URL: w.url, Mode: w.mode, Extract: w.extract, NotifyOn: w.notifyOn, Interval: w.interval,
				Headers: w.headers, Label: w.label, CreatedAt: w.createdAt, LastHash: w.lastHash, LastValue: w.lastValue, LastCheck: w.lastCheck,
			})
		}
	}
	for k, set := range r.subs {
		if want[k.meshID] {
			for pid := range set {
				add(k.meshID, rowSub, k.name+"|"+pid, pid, struct{ Stream string }{k.name})
			}
		}
	}
	for k, e := range r.servers {
		if want[k.meshID] {
			add(k.meshID, rowMCP, k.name, e.presenceID, mcpRecord{
				Name: e.name, Description: e.description, HostedBy: e.hostedBy, MemberID: e.memberID, Tools: e.tools,
				Persistent: e.persistent, Online: e.online, RegisteredAt: e.registeredAt, OfflineSince: e.offlineSince,
			})
		}
	}
	for meshID, k := range r.clocks {
		if want[meshID] {
			add(meshID, rowClock, "clock", "", clockRecord{Speed: k.speed, Paused: k.paused, Tick: k.tick, SimTime: k.simTime, StartedAt: k.startedAt})
		}
	}
	return rows
}

func (r *Realtime) writeRows(ctx context.Context, meshes []string, rows []realtimeRow) error {
	tbl := r.db.Table("meshbroker_realtime")
	now := r.now().UTC()
	return r.db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec("DELETE FROM "+tbl+" WHERE mesh_id IN ?", meshes).Error; err != nil {
			return fmt.Errorf("clear realtime rows: %w", err)
		}
		for len(rows) > 0 {
			n := min(len(rows), 200)
			var q strings.Builder
			q.WriteString("INSERT INTO " + tbl + " (mesh_id, kind, key, presence_id, body, updated_at) VALUES ")
			args := make([]any, 0, n*6)
			for i, row := range rows[:n] {
				if i > 0 {
					q.WriteString(", ")
				}
				q.WriteString("(?, ?, ?, ?, ?, ?)")
				args = append(args, row.MeshID, row.Kind, row.Key, row.PresenceID, row.Body, now)
			}
			if err := tx.Exec(q.String(), args...).Error; err != nil {
				return fmt.Errorf("write realtime rows: %w", err)
			}
			rows = rows[n:]
		}
		return nil
	})
}

// persistAll writes every mesh's state: the last write at Close.
func (r *Realtime) persistAll() {
	r.mu.Lock()
	for _, w := range r.watches {
		r.markDirtyLocked(w.meshID)
	}
	for k := range r.subs {
		r.markDirtyLocked(k.meshID)
	}
	for k := range r.servers {
		r.markDirtyLocked(k.meshID)
	}
	for m := range r.clocks {
		r.markDirtyLocked(m)
	}
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.flushState(ctx); err != nil {
		r.log.Error("persist realtime state at shutdown", "err", err)
	}
}

// RestoreState loads what the previous process persisted, for the
// presences that presence restored: watches are re-armed (a watch without
// a baseline checks at once), subscriptions and MCP entries are re-bound
// (an entry whose host is in grace answers calls with host_unavailable,
// R3), and clocks continue where they were. Rows of presences that were
// not restored are dropped (their meshes rewritten at the next flush).
// Call once at start, after PresenceService.RestoreLeases and before the
// first socket.
func (r *Realtime) RestoreState(ctx context.Context) error {
	var rows []realtimeRow
	if err := r.db.WithContext(ctx).Raw("SELECT mesh_id, kind, key, presence_id, body FROM " + r.db.Table("meshbroker_realtime") + " ORDER BY updated_at, key").Scan(&rows).Error; err != nil {
		return fmt.Errorf("restore realtime state: %w", err)
	}
	var baselines []*watch
	counts := map[string]int{}
	r.mu.Lock()
	for _, row := range rows {
		pid := ""
		if row.PresenceID != nil {
			pid = *row.PresenceID
		}
		present := pid != "" && r.presence.Get(pid) != nil
		switch row.Kind {
		case rowWatch:
			var rec watchRecord
			if json.Unmarshal(row.Body, &rec) != nil || !present {
				r.markDirtyLocked(row.MeshID)
				continue
			}
			w := &watch{
				id: rec.ID, meshID: row.MeshID, presenceID: pid, memberID: rec.MemberID, url: rec.URL, mode: rec.Mode, extract: rec.Extract,
				notifyOn: rec.NotifyOn, interval: rec.Interval, every: time.Duration(rec.Interval * float64(time.Second)), headers: rec.Headers,
				label: rec.Label, createdAt: rec.CreatedAt, lastHash: rec.LastHash, lastValue: rec.LastValue, lastCheck: rec.LastCheck,
			}
			r.seq++
			w.seq = r.seq
			r.watches[w.id] = w
			w.timer = time.AfterFunc(w.every, func() { r.fireWatch(w) })
			if w.lastValue == "" && r.beginCheckLocked(w) {
				baselines = append(baselines, w)
			}
		case rowSub:
			var rec struct{ Stream string }
			if json.Unmarshal(row.Body, &rec) != nil || !present {
				r.markDirtyLocked(row.MeshID)
				continue
			}
			k := streamKey{row.MeshID, rec.Stream}
			if r.subs[k] == nil {
				r.subs[k] = map[string]bool{}
			}
			r.subs[k][pid] = true
		case rowMCP:
			var rec mcpRecord
			if json.Unmarshal(row.Body, &rec) != nil {
				r.markDirtyLocked(row.MeshID)
				continue
			}
			e := &mcpServer{
				meshID: row.MeshID, name: rec.Name, description: rec.Description, tools: rec.Tools, hostedBy: rec.HostedBy,
				persistent: rec.Persistent, online: rec.Online, presenceID: pid, memberID: rec.MemberID,
				registeredAt: rec.RegisteredAt, offlineSince: rec.OfflineSince,
			}
			r.seq++
			e.seq = r.seq
			k := mcpKey{row.MeshID, rec.Name}
			r.servers[k] = e
			if e.online && !present {
				// Its host was not restored: what its eviction would have done.
				r.takeOfflineLocked(k, e)
				r.markDirtyLocked(row.MeshID)
			}
		case rowClock:
			var rec clockRecord
			if json.Unmarshal(row.Body, &rec) != nil {
				continue
			}
			k := &meshClock{meshID: row.MeshID, speed: ClockSpeed(rec.Speed), paused: rec.Paused, tick: rec.Tick, simTime: rec.SimTime, startedAt: rec.StartedAt}
			r.clocks[row.MeshID] = k
			if !k.paused {
				if r.presence.MeshCount(row.MeshID) == 0 {
					k.paused = true // 04 §2 step 8: nobody left in the mesh
					r.markDirtyLocked(row.MeshID)
				} else {
					r.startClockLocked(k)
				}
			}
		}
		counts[row.Kind]++
	}
	r.mu.Unlock()
	for _, w := range baselines {
		go r.runCheck(w)
	}
	if len(rows) > 0 {
		r.log.Info("realtime state restored", "watches", counts[rowWatch], "subscriptions", counts[rowSub], "mcp", counts[rowMCP], "clocks", counts[rowClock])
	}
	return nil
}
