package services

import (
	"testing"
	"time"
)

// Limiters keep a burst per key, refill continuously, forget a key once its
// bucket is full again, and never hold more than max keys.
func TestLimitersBoundedAndReleased(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	l := NewLimiters[int](30, 30, 100) // the hook defaults: full again 60 s after the last take
	for i := range 30 {
		if !l.Take(1, now) {
			t.Fatalf("take %d of a new bucket refused", i)
		}
	}
	if l.Take(1, now) {
		t.Fatal("31st take in the same instant allowed")
	}
	if !l.Take(1, now.Add(2*time.Second)) || l.Take(1, now.Add(2*time.Second)) {
		t.Fatal("2 s at 30/min should refill exactly one token")
	}
	for k := 2; k <= 1000; k++ { // a flood of distinct keys
		l.Take(k, now.Add(3*time.Second))
	}
	if n := l.Len(); n != 100 {
		t.Fatalf("%d buckets kept, want the cap of 100", n)
	}
	l.Sweep(now.Add(3*time.Second + 59*time.Second))
	if n := l.Len(); n != 100 {
		t.Fatalf("swept %d buckets that were not full yet", 100-n)
	}
	l.Sweep(now.Add(3*time.Second + 60*time.Second))
	if n := l.Len(); n != 0 {
		t.Fatalf("%d buckets kept a minute after their last take", n)
	}
	// A take also releases the idle ones, without the timer.
	l.Take(1, now.Add(time.Hour))
	l.Take(2, now.Add(time.Hour+61*time.Second))
	if n := l.Len(); n != 1 {
		t.Fatalf("%d buckets after a take past the idle one's refill, want 1", n)
	}
	if u := NewLimiters[string](10, 0, 10); !u.Take("x", now) || u.Len() != 0 {
		t.Fatal("perMinute 0 must be unlimited and keep nothing")
	}
}
