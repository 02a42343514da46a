package services

import (
	"runtime"
	"runtime/debug"
	"testing"
)

var trimSink [][]byte

func TestMemoryTrimmerActsOnlyWhenQuietAndWorthIt(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(-1)) // no collection unless the test runs one
	runtime.GC()
	tr := NewMemoryTrimmer(8 << 20)
	tr.Tick() // primes the cycle count

	// A collection since the last tick: the broker is busy, leave it.
	runtime.GC()
	if tr.Tick() {
		t.Fatal("trimmed right after a collection")
	}

	// Quiet, but almost nothing to reclaim.
	if tr.Tick() {
		t.Fatal("trimmed with nothing to reclaim")
	}

	// A burst's garbage, then quiet: trim, once.
	for range 64 {
		trimSink = append(trimSink, make([]byte, 512<<10))
	}
	trimSink = nil
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	if !tr.Tick() {
		t.Fatal("did not trim 32 MB of garbage")
	}
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if after.HeapReleased <= before.HeapReleased || after.HeapInuse >= before.HeapInuse {
		t.Fatalf("heap in use %d -> %d, released %d -> %d", before.HeapInuse, after.HeapInuse, before.HeapReleased, after.HeapReleased)
	}
	if tr.Tick() {
		t.Fatal("trimmed again with nothing left to reclaim")
	}
}
