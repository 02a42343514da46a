package services

import (
	"sync"
	"time"
)

// TokenBuckets is a set of continuous-refill token buckets keyed by string
// (member id for sends, a hash of "pid:cwd" for hooks). A new key starts
// full. At most maxTokenBuckets are kept (shedLocked).
//
// Concurrency: all state is guarded by mu; Take is O(1) and never blocks
// on anything but mu.
type TokenBuckets struct {
	capacity float64
	perMs    float64 // tokens added per millisecond
	now      func() time.Time

	mu      sync.Mutex
	buckets map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

// NewTokenBuckets makes buckets holding capacity tokens and refilling
// perMinute tokens a minute. perMinute 0 means unlimited.
func NewTokenBuckets(capacity, perMinute int, now func() time.Time) *TokenBuckets {
	return &TokenBuckets{capacity: float64(capacity), perMs: float64(perMinute) / 60000, now: now, buckets: map[string]*bucket{}}
}

// Take spends one token for key and reports whether there was one.
func (t *TokenBuckets) Take(key string) bool {
	if t.perMs == 0 {
		return true
	}
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.buckets[key]
	if b == nil {
		if len(t.buckets) >= maxTokenBuckets {
			t.shedLocked(now)
		}
		b = &bucket{tokens: t.capacity, last: now}
		t.buckets[key] = b
	}
	if elapsed := now.Sub(b.last); elapsed > 0 {
		b.tokens = min(t.capacity, b.tokens+float64(elapsed.Microseconds())/1000*t.perMs)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// maxTokenBuckets bounds the set: the hook limiter is keyed by what
// unauthenticated callers send.
const maxTokenBuckets = 100_000

// shedLocked makes room when the set is full: first the buckets that have
// refilled to capacity, which are no different from a missing one; if a
// flood of fresh keys left none, all of them, so the cost of a flood is
// that limits start over, never memory. mu must be held.
func (t *TokenBuckets) shedLocked(now time.Time) {
	for k, b := range t.buckets {
		if b.tokens+float64(now.Sub(b.last).Microseconds())/1000*t.perMs >= t.capacity {
			delete(t.buckets, k)
		}
	}
	if len(t.buckets) >= maxTokenBuckets {
		clear(t.buckets)
	}
}

// GC drops buckets untouched for longer than idle.
func (t *TokenBuckets) GC(idle time.Duration) {
	cutoff := t.now().Add(-idle)
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, b := range t.buckets {
		if b.last.Before(cutoff) {
			delete(t.buckets, k)
		}
	}
}
