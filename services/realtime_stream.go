package services

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// Streams (04 §4): live, history-less channels. The catalogue is
// mesh.stream; subscriptions are in memory, keyed by presence, so they
// survive a reattach and are dropped at eviction. A stream need not be in
// the catalogue to be subscribed to or published on.

type streamKey struct{ meshID, name string }

// CreateStream adds the stream to the catalogue, or finds it: the first
// creator's name is kept and the id is the same every time.
func (r *Realtime) CreateStream(ctx context.Context, c *Conn, name string) (protocol.StreamCreated, error) {
	creator, ok, err := r.memberName(ctx, c)
	if err != nil {
		return protocol.StreamCreated{}, err
	}
	if !ok {
		creator = "peer"
	}
	t := r.db.Table("stream")
	if err := r.db.WithContext(ctx).Exec("INSERT INTO "+t+" (id, mesh_id, name, created_by_name, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (mesh_id, name) DO NOTHING",
		models.NewID(), c.MeshID, name, creator, r.now().UTC().Truncate(time.Millisecond)).Error; err != nil {
		return protocol.StreamCreated{}, fmt.Errorf("create stream: %w", err)
	}
	var ids []string
	if err := r.db.WithContext(ctx).Raw("SELECT id FROM "+t+" WHERE mesh_id = ? AND name = ? LIMIT 1", c.MeshID, name).Scan(&ids).Error; err != nil {
		return protocol.StreamCreated{}, fmt.Errorf("find stream: %w", err)
	}
	if len(ids) == 0 {
		return protocol.StreamCreated{}, fmt.Errorf("stream %q of mesh %s vanished after its insert", name, c.MeshID)
	}
	r.log.Debug("ws create_stream", "presence_id", c.PresenceID, "stream_id", ids[0])
	return protocol.StreamCreated{Type: "stream_created", ID: ids[0], Name: name}, nil
}

// Subscribe adds the caller's presence to the stream (idempotent).
func (r *Realtime) Subscribe(c *Conn, name string) {
	k := streamKey{c.MeshID, name}
	r.mu.Lock()
	set := r.subs[k]
	if set == nil {
		set = map[string]bool{}
		r.subs[k] = set
	}
	set[c.PresenceID] = true
	r.markDirtyLocked(c.MeshID)
	r.mu.Unlock()
}

// Unsubscribe removes the caller's presence from the stream.
func (r *Realtime) Unsubscribe(c *Conn, name string) {
	k := streamKey{c.MeshID, name}
	r.mu.Lock()
	if set := r.subs[k]; set != nil {
		delete(set, c.PresenceID)
		if len(set) == 0 {
			delete(r.subs, k)
		}
		r.markDirtyLocked(c.MeshID)
	}
	r.mu.Unlock()
}

// Publish sends data to every subscriber of the stream but the publishing
// presence (sibling sessions of its member included). Nothing is stored;
// subscribers in grace miss it. data nil means the frame had none.
func (r *Realtime) Publish(ctx context.Context, c *Conn, name string, data json.RawMessage) error {
	r.metrics.MessagesRouted.WithLabelValues("stream").Inc()
	r.mu.Lock()
	set := r.subs[streamKey{c.MeshID, name}]
	targets := make([]string, 0, len(set))
	for id := range set {
		if id != c.PresenceID {
			targets = append(targets, id)
		}
	}
	r.mu.Unlock()
	if len(targets) == 0 {
		return nil
	}
	by, ok, err := r.memberName(ctx, c)
	if err != nil {
		return err
	}
	if !ok {
		by = "peer"
	}
	f := protocol.MustEncode(protocol.StreamData{Type: "stream_data", Stream: name, Data: data, PublishedBy: by})
	for _, id := range targets {
		r.sendTo(id, f)
	}
	return nil
}

// ListStreams returns the mesh's catalogue, oldest first, with the current
// number of subscribed presences (those in grace included).
func (r *Realtime) ListStreams(ctx context.Context, c *Conn) ([]protocol.StreamInfo, error) {
	var rows []struct {
		ID            string
		Name          string
		CreatedByName *string
		CreatedAt     time.Time
	}
	if err := r.db.WithContext(ctx).Raw("SELECT id, name, created_by_name, created_at FROM "+r.db.Table("stream")+" WHERE mesh_id = ? ORDER BY created_at, id", c.MeshID).Scan(&rows).Error; err != nil {
		return nil, fmt.Errorf("list streams: %w", err)
	}
	out := make([]protocol.StreamInfo, 0, len(rows))
	r.mu.Lock()
	for _, row := range rows {
		info := protocol.StreamInfo{ID: row.ID, Name: row.Name, CreatedAt: protocol.ISO(row.CreatedAt), SubscriberCount: len(r.subs[streamKey{c.MeshID, row.Name}])}
		if row.CreatedByName != nil {
			info.CreatedBy = *row.CreatedByName
		}
		out = append(out, info)
	}
	r.mu.Unlock()
	return out, nil
}

// dropSubscriptionsLocked removes c from every stream (eviction, 04 §2
// step 6) and drops sets left empty.
func (r *Realtime) dropSubscriptionsLocked(c *Conn) int {
	n := 0
	for k, set := range r.subs {
		if set[c.PresenceID] {
			delete(set, c.PresenceID)
			n++
			if len(set) == 0 {
				delete(r.subs, k)
			}
		}
	}
	return n
}
