package services

import (
	"container/heap"
	"encoding/hex"
	"math"
	"sync"
	"time"
)

// helloReplays remembers the signed hellos seen inside the timestamp skew
// window, so the same (key, timestamp, signature) is accepted once (H10).
// A hello whose timestamp is ts stops passing the skew check at ts + skew,
// so that is when its entry expires; after that the skew check refuses a
// replay on its own.
//
// Memory is bounded: only hellos that passed signature verification and
// member authorization are recorded, expired entries are dropped on every
// call, and at most max entries are kept. When full, the entry closest to
// expiry goes first: forgetting it early only reopens a replay of that one
// hello for the rest of its window, and filling the cache takes max
// authorized hellos inside one window.
//
// Concurrency: every method takes mu; the map and the heap are touched only
// under it. Check-and-record is one critical section, so of two sockets
// racing the same hello exactly one wins.
type helloReplays struct {
	skew time.Duration
	max  int

	mu    sync.Mutex
	seen  map[replayKey]struct{}
	order replayHeap // the same entries, soonest expiry first
}

// replayKey is a signed hello's identity: the decoded key and signature
// (so upper- and lower-case hex spellings are one hello) and the timestamp.
type replayKey struct {
	key [32]byte
	sig [64]byte
	ts  uint64 // math.Float64bits of the signed timestamp
}

type replayEntry struct {
	k   replayKey
	exp time.Time
}

type replayHeap []replayEntry

func (h replayHeap) Len() int           { return len(h) }
func (h replayHeap) Less(i, j int) bool { return h[i].exp.Before(h[j].exp) }
func (h replayHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *replayHeap) Push(x any)        { *h = append(*h, x.(replayEntry)) }
func (h *replayHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}

// defaultReplayEntries bounds the cache: about 150 bytes an entry, so
// 64 Ki entries stay under 10 MB, and a window of 60 s would need more than
// a thousand authorized hellos a second to fill it.
const defaultReplayEntries = 1 << 16

func newHelloReplays(skew time.Duration, max int) *helloReplays {
	return &helloReplays{skew: skew, max: max, seen: map[replayKey]struct{}{}}
}

// firstUse records the hello signed by keyHex at ts with sigHex and reports
// whether it is the first time inside the window. The hex strings have been
// verified (a signature checked against the key), so they decode.
func (r *helloReplays) firstUse(keyHex string, ts float64, sigHex string, now time.Time) bool {
	var k replayKey
	if n, err := hex.Decode(k.key[:], []byte(keyHex)); err != nil || n != len(k.key) {
		return true // cannot happen after verification; nothing to key on
	}
	if n, err := hex.Decode(k.sig[:], []byte(sigHex)); err != nil || n != len(k.sig) {
		return true
	}
	k.ts = math.Float64bits(ts)
	exp := time.UnixMilli(int64(ts)).Add(r.skew + time.Millisecond) // the skew check allows exactly skew

	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.order) > 0 && !r.order[0].exp.After(now) {
		delete(r.seen, heap.Pop(&r.order).(replayEntry).k)
	}
	if _, dup := r.seen[k]; dup {
		return false
	}
	for len(r.order) >= r.max {
		delete(r.seen, heap.Pop(&r.order).(replayEntry).k)
	}
	r.seen[k] = struct{}{}
	heap.Push(&r.order, replayEntry{k: k, exp: exp})
	return true
}

// size is the number of remembered hellos (tests).
func (r *helloReplays) size() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}
