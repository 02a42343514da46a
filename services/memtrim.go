package services

import (
	"runtime/debug"
	"runtime/metrics"
)

// MemoryTrimmer gives memory a burst left behind back to the OS once the
// broker has gone quiet. The Go runtime returns freed heap only after a
// collection has lowered its heap goal, and a broker that stops allocating
// runs no collection (the forced one comes two minutes later): after a
// 100,000-message burst it held ~100 MB for those two minutes, and the
// emptied queues and maps until the next burst.
//
// Quiet means no collection ran since the previous Tick: the broker
// allocated less than a heap goal's worth in that interval, so a forced
// collection is cheap and nothing is in a hurry. A busy broker is left to
// the runtime. What a trim would reclaim is estimated as the heap held
// (objects, dead or alive, plus free spans not yet returned) minus what the
// last collection found alive.
//
// Concurrency: Tick is called by one goroutine (the maintenance loop).
type MemoryTrimmer struct {
	minFree    uint64 // trim only when about this much would be reclaimed
	lastCycles uint64
	samples    []metrics.Sample
}

// NewMemoryTrimmer returns a trimmer that acts when about minFree bytes or
// more would be reclaimed.
func NewMemoryTrimmer(minFree uint64) *MemoryTrimmer {
	return &MemoryTrimmer{minFree: minFree, samples: []metrics.Sample{
		{Name: "/gc/cycles/total:gc-cycles"},
		{Name: "/memory/classes/heap/free:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/gc/heap/live:bytes"},
	}}
}

// Tick trims if the broker has been quiet since the last call and holds
// enough free heap to be worth it; it reports whether it trimmed.
func (t *MemoryTrimmer) Tick() bool {
	metrics.Read(t.samples)
	cycles := t.samples[0].Value.Uint64()
	held := t.samples[1].Value.Uint64() + t.samples[2].Value.Uint64()
	live := t.samples[3].Value.Uint64()
	quiet := cycles == t.lastCycles
	t.lastCycles = cycles
	if !quiet || held < live+t.minFree {
		return false
	}
	debug.FreeOSMemory()
	metrics.Read(t.samples[:1])
	t.lastCycles = t.samples[0].Value.Uint64()
	return true
}
