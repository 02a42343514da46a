package services

import (
	"strconv"
	"testing"
	"time"
)

func TestTTLCache(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	c := newTTLCache[int](time.Second, 3)
	if _, ok := c.get("a", t0); ok {
		t.Fatal("hit on an empty cache")
	}
	c.put("a", 1, t0)
	if v, ok := c.get("a", t0.Add(999*time.Millisecond)); !ok || v != 1 {
		t.Fatalf("fresh entry: %d %v", v, ok)
	}
	if _, ok := c.get("a", t0.Add(time.Second)); ok {
		t.Fatal("hit at the ttl")
	}

	// Full: expired entries make room first, fresh ones survive.
	c.put("b", 2, t0.Add(500*time.Millisecond))
	c.put("c", 3, t0.Add(500*time.Millisecond))
	c.put("d", 4, t0.Add(1200*time.Millisecond)) // "a" has expired by then
	for k, want := range map[string]int{"b": 2, "c": 3, "d": 4} {
		if v, ok := c.get(k, t0.Add(1300*time.Millisecond)); !ok || v != want {
			t.Fatalf("%s after making room: %d %v", k, v, ok)
		}
	}
	// Full of fresh entries: start over rather than grow.
	c.put("e", 5, t0.Add(1300*time.Millisecond))
	if len(c.entries) != 1 {
		t.Fatalf("%d entries after overflow, want 1", len(c.entries))
	}
	for i := range 10 {
		c.put(strconv.Itoa(i), i, t0.Add(1300*time.Millisecond))
	}
	if len(c.entries) > 3 {
		t.Fatalf("cache grew to %d", len(c.entries))
	}

	c.put("x1", 1, t0)
	c.put("y1", 2, t0)
	c.dropIf(func(k string) bool { return k[0] == 'x' })
	c.drop("y1")
	if _, ok := c.get("x1", t0); ok {
		t.Fatal("dropIf kept a match")
	}
	if _, ok := c.get("y1", t0); ok {
		t.Fatal("drop kept the key")
	}

	// A put sweeps what expired, at most once per ttl; fresh entries stay.
	s := newTTLCache[int](time.Second, 100)
	s.put("old", 1, t0)                             // sweeps (the first put), nothing to drop
	s.put("newer", 2, t0.Add(900*time.Millisecond)) // within a ttl of that sweep: none
	s.put("k", 3, t0.Add(1500*time.Millisecond))    // sweeps: "old" is 1.5 s old
	if _, ok := s.entries["old"]; ok || len(s.entries) != 2 {
		t.Fatalf("after a ttl, entries %v", s.entries)
	}

	off := newTTLCache[int](0, 3)
	off.put("a", 1, t0)
	if _, ok := off.get("a", t0); ok {
		t.Fatal("a zero ttl cached")
	}
}
