package services

import (
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"golang.org/x/time/rate"
)

// Limiters is a bounded set of token buckets (golang.org/x/time/rate), one
// per key: member ids for sends; remote addresses and (pid, cwd) digests for
// the unauthenticated hook route. A new key starts full.
//
// Memory is bounded two ways. A bucket untouched for as long as it takes to
// refill completely is indistinguishable from a new one, so it is dropped:
// on every Take for the oldest buckets, and by Sweep for all of them, which
// the broker runs on a timer. And the set holds at most max keys in
// least-recently-used order: a flood of distinct keys evicts the coldest
// bucket instead of growing, at worst giving that key a fresh burst, which
// is why the hook route limits per address before it limits per key.
//
// Concurrency: every method takes mu; none blocks on anything else. The
// caller's clock is passed in, so tests move time instead of sleeping.
type Limiters[K comparable] struct {
	limit rate.Limit
	burst int
	idle  time.Duration // refill time of an empty bucket: untouched this long, it is full

	mu   sync.Mutex
	lru  *simplelru.LRU[K, *limiterEntry] // most recently taken first
	none bool                             // perMinute 0: unlimited, nothing is kept
}

type limiterEntry struct {
	lim  *rate.Limiter
	last time.Time // last Take
}

// NewLimiters makes buckets of burst tokens refilling perMinute tokens a
// minute, at most max of them. perMinute 0 means unlimited.
func NewLimiters[K comparable](burst, perMinute, max int) *Limiters[K] {
	l := &Limiters[K]{none: perMinute <= 0, burst: max1(burst)}
	if l.none {
		return l
	}
	l.limit = rate.Limit(float64(perMinute) / 60)
	l.idle = time.Duration(float64(l.burst) / float64(l.limit) * float64(time.Second))
	l.lru, _ = simplelru.NewLRU[K, *limiterEntry](max1(max), nil) // only fails for a size below 1
	return l
}

func max1(n int) int { return max(n, 1) }

// Take spends one token of key's bucket at now and reports whether there
// was one.
func (l *Limiters[K]) Take(key K, now time.Time) bool {
	if l.none {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.dropIdleLocked(now)
	e, ok := l.lru.Get(key)
	if !ok {
		e = &limiterEntry{lim: rate.NewLimiter(l.limit, l.burst)}
		l.lru.Add(key, e)
	}
	e.last = now
	return e.lim.AllowN(now, 1)
}

// Sweep drops every bucket that has refilled completely by now.
func (l *Limiters[K]) Sweep(now time.Time) {
	if l.none {
		return
	}
	l.mu.Lock()
	l.dropIdleLocked(now)
	l.mu.Unlock()
}

// Len is how many buckets are kept.
func (l *Limiters[K]) Len() int {
	if l.none {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}

// dropIdleLocked removes buckets from the cold end while they are full
// again. Take refreshes recency and last together, so the cold end holds
// the oldest last.
func (l *Limiters[K]) dropIdleLocked(now time.Time) {
	for {
		_, e, ok := l.lru.GetOldest()
		if !ok || now.Sub(e.last) < l.idle {
			return
		}
		l.lru.RemoveOldest()
	}
}
