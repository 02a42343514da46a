package services

import (
	"sync"
	"time"
)

// ttlCache holds values read from the database for a short while: an entry
// older than ttl is a miss, and the caller reads again and puts the result.
// Expired entries are swept by a put at most once per ttl, so keys read
// once (a hello's member lookup) do not stay for good. It is bounded: once
// it holds max entries, a put first drops the expired ones and, if that
// frees nothing, starts over empty, so a flood of distinct keys costs
// reloads, never unbounded memory. A ttl of zero caches nothing.
//
// Concurrency: safe for concurrent use; the lock is never held across a
// database read, so two callers may load the same key at once, and the
// later put wins.
type ttlCache[V any] struct {
	ttl time.Duration // static
	max int           // static

	mu      sync.Mutex
	entries map[string]ttlEntry[V]
	swept   time.Time // when put last dropped the expired entries
}

type ttlEntry[V any] struct {
	loaded time.Time
	value  V
}

func newTTLCache[V any](ttl time.Duration, max int) *ttlCache[V] {
	return &ttlCache[V]{ttl: ttl, max: max, entries: map[string]ttlEntry[V]{}}
}

// get returns the value for key if it was loaded less than ttl before now.
func (c *ttlCache[V]) get(key string, now time.Time) (V, bool) {
	c.mu.Lock()
	e, ok := c.entries[key]
	c.mu.Unlock()
	if !ok || now.Sub(e.loaded) >= c.ttl {
		var zero V
		return zero, false
	}
	return e.value, true
}

// put stores value as loaded at loaded.
func (c *ttlCache[V]) put(key string, value V, loaded time.Time) {
	if c.ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	_, known := c.entries[key]
	if full := !known && len(c.entries) >= c.max; full || loaded.Sub(c.swept) >= c.ttl {
		c.swept = loaded
		for k, e := range c.entries {
			if loaded.Sub(e.loaded) >= c.ttl {
				delete(c.entries, k)
			}
		}
		if full && len(c.entries) >= c.max {
			clear(c.entries)
		}
	}
	c.entries[key] = ttlEntry[V]{loaded: loaded, value: value}
}

// drop forgets key.
func (c *ttlCache[V]) drop(key string) {
	c.mu.Lock()
	delete(c.entries, key)
	c.mu.Unlock()
}

// dropIf forgets every key match accepts.
func (c *ttlCache[V]) dropIf(match func(key string) bool) {
	c.mu.Lock()
	for k := range c.entries {
		if match(k) {
			delete(c.entries, k)
		}
	}
	c.mu.Unlock()
}
