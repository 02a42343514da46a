package services

import (
	"strconv"
	"testing"
	"time"
)

// The hook limiter is keyed by what unauthenticated callers send: a flood
// of fresh keys must not grow the set of buckets without bound.
func TestTokenBucketsBounded(t *testing.T) {
	const bucketBound = 100_000 // maxTokenBuckets
	now := time.Unix(1_000_000, 0)
	tb := NewTokenBuckets(30, 30, func() time.Time { return now })
	for i := range bucketBound * 3 {
		if !tb.Take("k" + strconv.Itoa(i)) {
			t.Fatalf("fresh key %d refused", i)
		}
		if i%1000 == 0 {
			now = now.Add(time.Millisecond)
		}
	}
	tb.mu.Lock()
	n := len(tb.buckets)
	tb.mu.Unlock()
	if n > bucketBound {
		t.Fatalf("%d buckets after %d fresh keys, want at most %d", n, bucketBound*3, bucketBound)
	}
	// A key that spent its tokens stays limited while the set is not full.
	for range 30 {
		tb.Take("busy")
	}
	if tb.Take("busy") {
		t.Fatal("an empty bucket granted a token")
	}
}
