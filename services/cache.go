package services

import (
	"context"
	"strconv"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/sync/singleflight"
)

// loadCache holds values read from the database for a short while, for
// lookups a reconnect storm or a busy mesh would otherwise repeat per
// socket or per send (member and mesh rows, grants, services, topics).
//
// It is a bounded LRU (hashicorp/golang-lru/v2) whose entries carry the
// time they were loaded, checked against the service clock on every get:
// an entry older than ttl is a miss. A full cache evicts the least
// recently used entry, so a flood of distinct keys costs reloads, never
// unbounded memory. Loads of one key are single-flight
// (golang.org/x/sync/singleflight): callers that miss together share one
// query. A ttl of zero caches nothing and loads every time.
//
// The library's expirable LRU was not used: in v2.0.7 it starts a cleanup
// goroutine per cache that cannot be stopped (five per broker, for the
// life of the process, in every test that starts one), and it expires by
// wall-clock time where the services run on an injectable clock.
//
// Concurrency: safe for concurrent use. drop and dropIf bump a generation
// under mu; a load that began before the bump does not store its result
// and is not joined by callers arriving after it, so a ban's invalidation
// is never undone by a query that raced it.
type loadCache[V any] struct {
	ttl    time.Duration // static
	lru    *lru.Cache[string, cached[V]]
	flight singleflight.Group

	mu  sync.Mutex
	gen uint64
}

type cached[V any] struct {
	loaded time.Time
	value  V
}

func newLoadCache[V any](ttl time.Duration, size int) *loadCache[V] {
	c, err := lru.New[string, cached[V]](size)
	if err != nil {
		panic(err) // only for size <= 0, a programming error
	}
	return &loadCache[V]{ttl: ttl, lru: c}
}

// get returns the value for key if it was loaded less than ttl before now.
func (c *loadCache[V]) get(key string, now time.Time) (V, bool) {
	if c.ttl <= 0 {
		var zero V
		return zero, false
	}
	e, ok := c.lru.Get(key)
	if !ok || now.Sub(e.loaded) >= c.ttl {
		var zero V
		return zero, false
	}
	return e.value, true
}

// load returns the cached value for key, or runs fn once for every caller
// missing key at the same time and caches its result (not its error). fn
// runs with the first caller's context, detached from its cancellation so
// that one caller giving up does not fail the others.
func (c *loadCache[V]) load(ctx context.Context, key string, now time.Time, fn func(ctx context.Context) (V, error)) (V, error) {
	if v, ok := c.get(key, now); ok {
		return v, nil
	}
	if c.ttl <= 0 {
		return fn(ctx)
	}
	c.mu.Lock()
	gen := c.gen
	c.mu.Unlock()
	flightKey := key + "\x00" + strconv.FormatUint(gen, 10)
	v, err, _ := c.flight.Do(flightKey, func() (any, error) {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		v, err := fn(lctx)
		if err != nil {
			return v, err
		}
		c.mu.Lock()
		if c.gen == gen {
			c.lru.Add(key, cached[V]{loaded: now, value: v})
		}
		c.mu.Unlock()
		return v, nil
	})
	if err != nil {
		var zero V
		return zero, err
	}
	return v.(V), nil
}

// put caches v for key as loaded at loaded: a value read by a query of the
// caller's own (the lease restore reads member rows in bulk). A put is
// not subject to a drop that came earlier: it carries newer data.
func (c *loadCache[V]) put(key string, v V, loaded time.Time) {
	if c.ttl <= 0 {
		return
	}
	c.mu.Lock()
	c.lru.Add(key, cached[V]{loaded: loaded, value: v})
	c.mu.Unlock()
}

// drop forgets key.
func (c *loadCache[V]) drop(key string) {
	c.mu.Lock()
	c.gen++
	c.lru.Remove(key)
	c.mu.Unlock()
}

// dropIf forgets every key match accepts.
func (c *loadCache[V]) dropIf(match func(key string) bool) {
	c.mu.Lock()
	c.gen++
	for _, k := range c.lru.Keys() {
		if match(k) {
			c.lru.Remove(k)
		}
	}
	c.mu.Unlock()
}
