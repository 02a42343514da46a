package services

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestLoadCacheExpiresByTheServiceClock(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	c := newLoadCache[int](time.Second, 3)
	var loads atomic.Int32
	load := func(v int) func(context.Context) (int, error) {
		return func(context.Context) (int, error) { loads.Add(1); return v, nil }
	}
	if _, ok := c.get("a", t0); ok {
		t.Fatal("hit on an empty cache")
	}
	if v, err := c.load(context.Background(), "a", t0, load(1)); err != nil || v != 1 {
		t.Fatal(v, err)
	}
	if v, _ := c.load(context.Background(), "a", t0.Add(999*time.Millisecond), load(2)); v != 1 || loads.Load() != 1 {
		t.Fatalf("fresh entry reloaded: %d after %d loads", v, loads.Load())
	}
	if v, _ := c.load(context.Background(), "a", t0.Add(time.Second), load(2)); v != 2 || loads.Load() != 2 {
		t.Fatalf("entry at its ttl not reloaded: %d", v)
	}
}

func TestLoadCacheIsBounded(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	c := newLoadCache[int](time.Minute, 3)
	for i := range 100 {
		if _, err := c.load(context.Background(), strconv.Itoa(i), t0, func(context.Context) (int, error) { return i, nil }); err != nil {
			t.Fatal(err)
		}
	}
	if n := c.lru.Len(); n != 3 {
		t.Fatalf("%d entries, want 3", n)
	}
	if v, ok := c.get("99", t0); !ok || v != 99 {
		t.Fatal("the most recent entry was evicted")
	}
}

// Callers missing a key together share one load; errors are not cached.
func TestLoadCacheSingleFlight(t *testing.T) {
	c := newLoadCache[int](time.Minute, 10)
	now := time.Now()
	var loads atomic.Int32
	release := make(chan struct{})
	var started sync.WaitGroup
	var wg sync.WaitGroup
	for range 20 {
		started.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			started.Done()
			v, err := c.load(context.Background(), "k", now, func(context.Context) (int, error) {
				loads.Add(1)
				<-release
				return 7, nil
			})
			if err != nil || v != 7 {
				t.Errorf("%d %v", v, err)
			}
		}()
	}
	started.Wait()
	// Hold the first query until it has started, so callers pile up on it.
	// Whoever comes later finds the cached value: lateness never adds a
	// load, only a miss just before the store could.
	deadline := time.Now().Add(10 * time.Second)
	for loads.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond) // polling for the first load to begin
	}
	close(release)
	wg.Wait()
	if n := loads.Load(); n < 1 || n > 2 {
		t.Fatalf("%d loads for 20 concurrent callers", n)
	}
	boom := errors.New("boom")
	if _, err := c.load(context.Background(), "e", now, func(context.Context) (int, error) { return 0, boom }); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if _, ok := c.get("e", now); ok {
		t.Fatal("an error was cached")
	}
}

// An invalidation during a load keeps that load's result out of the cache
// and out of later callers' hands.
func TestLoadCacheDropDuringLoad(t *testing.T) {
	c := newLoadCache[string](time.Minute, 10)
	now := time.Now()
	inLoad, release := make(chan struct{}), make(chan struct{})
	done := make(chan string)
	go func() {
		v, _ := c.load(context.Background(), "m|k", now, func(context.Context) (string, error) {
			close(inLoad)
			<-release
			return "before ban", nil
		})
		done <- v
	}()
	<-inLoad
	c.dropIf(func(k string) bool { return k == "m|k" })
	v, err := c.load(context.Background(), "m|k", now, func(context.Context) (string, error) { return "after ban", nil })
	if err != nil || v != "after ban" {
		t.Fatalf("a caller after the drop got %q %v", v, err)
	}
	close(release)
	if old := <-done; old != "before ban" {
		t.Fatal(old)
	}
	if v, ok := c.get("m|k", now); !ok || v != "after ban" {
		t.Fatalf("cache holds %q %v after the raced load finished", v, ok)
	}
	c.drop("m|k")
	if _, ok := c.get("m|k", now); ok {
		t.Fatal("drop kept the key")
	}
}

func TestLoadCacheZeroTTLCachesNothing(t *testing.T) {
	c := newLoadCache[int](0, 10)
	var loads int
	for range 3 {
		_, _ = c.load(context.Background(), "k", time.Now(), func(context.Context) (int, error) { loads++; return 1, nil })
	}
	if loads != 3 || c.lru.Len() != 0 {
		t.Fatalf("%d loads, %d entries", loads, c.lru.Len())
	}
}
