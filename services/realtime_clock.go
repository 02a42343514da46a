package services

import (
	"math"
	"time"

	"github.com/claudemesh/meshbroker/protocol"
)

// The mesh simulation clock (04 §6). One per mesh, in memory (persisted
// for a restart by realtime_persist.go), never deleted. A running clock ticks every 60 s / speed; each tick advances
// simulated time by one minute and is pushed to every presence of the
// mesh. Any member may set, pause or resume it. It pauses by itself only
// when the last presence of the mesh is evicted (04 §2 step 8), and nothing
// resumes it but resume_clock (or set_clock on a running clock).

// meshClock is guarded by Realtime.mu.
type meshClock struct {
	meshID    string
	speed     float64
	paused    bool
	tick      int64
	simTime   time.Time
	startedAt time.Time
	period    time.Duration
	timer     *time.Timer // nil unless running
	gen       uint64      // bumped by every start and stop; a tick of an older generation is a no-op
}

// stopLocked stops the ticks (it does not set paused). Realtime.mu must be held.
func (k *meshClock) stopLocked() {
	k.gen++
	if k.timer != nil {
		k.timer.Stop()
		k.timer = nil
	}
}

// startLocked (re)starts the ticks with a fresh phase. Realtime.mu must be held.
func (r *Realtime) startClockLocked(k *meshClock) {
	k.stopLocked()
	if r.closed {
		return
	}
	gen := k.gen
	k.period = time.Duration(float64(time.Minute) / k.speed)
	k.timer = time.AfterFunc(k.period, func() { r.clockTick(k, gen) })
}

// clockTick is a running clock's timer.
func (r *Realtime) clockTick(k *meshClock, gen uint64) {
	r.mu.Lock()
	if k.gen != gen || k.timer == nil {
		r.mu.Unlock()
		return
	}
	k.timer.Reset(k.period)
	k.tick++
	k.simTime = k.simTime.Add(time.Minute)
	data := protocol.Tick{Tick: k.tick, SimTime: protocol.ISO(k.simTime), Speed: k.speed}
	r.mu.Unlock()
	r.presence.Broadcast(k.meshID, r.systemPush(k.meshID, "tick", "low", data), nil)
}

func (k *meshClock) status() protocol.ClockStatus {
	return protocol.ClockStatus{Type: "clock_status", Speed: k.speed, Paused: k.paused, Tick: k.tick, SimTime: protocol.ISO(k.simTime), StartedAt: protocol.ISO(k.startedAt)}
}

// ClockSpeed turns set_clock's speed (JavaScript's Number(speed)) into the
// effective speed: 0 or not a number is 1, then clamped to [1, 100].
func ClockSpeed(n float64) float64 {
	if n == 0 || math.IsNaN(n) {
		n = 1
	}
	return min(max(n, clockMinSpeed), clockMaxSpeed)
}

// SetClock creates the mesh's clock or changes its speed (tick, sim time,
// start and paused are kept), restarting the ticks unless it is paused.
func (r *Realtime) SetClock(c *Conn, speed float64) protocol.ClockStatus {
	speed = ClockSpeed(speed)
	now := r.now()
	r.mu.Lock()
	k := r.clocks[c.MeshID]
	if k == nil {
		k = &meshClock{meshID: c.MeshID, simTime: now, startedAt: now}
		r.clocks[c.MeshID] = k
	}
	k.speed = speed
	if !k.paused {
		r.startClockLocked(k)
	}
	r.markDirtyLocked(c.MeshID)
	st := k.status()
	r.mu.Unlock()
	r.log.Info("clock set", "presence_id", c.PresenceID, "mesh", c.MeshID, "speed", speed, "paused", st.Paused)
	return st
}

// PauseClock stops the ticks. Errors: no_clock.
func (r *Realtime) PauseClock(c *Conn) (protocol.ClockStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := r.clocks[c.MeshID]
	if k == nil {
		return protocol.ClockStatus{}, errNoClock
	}
	k.paused = true
	k.stopLocked()
	r.markDirtyLocked(c.MeshID)
	return k.status(), nil
}

// ResumeClock restarts a paused clock with a fresh phase; a running one is
// left alone. Errors: no_clock.
func (r *Realtime) ResumeClock(c *Conn) (protocol.ClockStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := r.clocks[c.MeshID]
	if k == nil {
		return protocol.ClockStatus{}, errNoClock
	}
	if k.paused {
		k.paused = false
		r.startClockLocked(k)
		r.markDirtyLocked(c.MeshID)
	}
	return k.status(), nil
}

var errNoClock = newError(protocol.CodeNoClock, "No clock running for this mesh")

// GetClock returns the clock's status; a mesh without one reads speed 0,
// paused, tick 0, at now.
func (r *Realtime) GetClock(c *Conn) protocol.ClockStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	if k := r.clocks[c.MeshID]; k != nil {
		return k.status()
	}
	now := protocol.ISO(r.now())
	return protocol.ClockStatus{Type: "clock_status", Speed: 0, Paused: true, Tick: 0, SimTime: now, StartedAt: now}
}

// pauseIfEmpty is 04 §2 step 8: once the mesh has no presence left, online
// or in grace, its running clock stops and reads paused.
func (r *Realtime) pauseIfEmpty(meshID string) {
	if r.presence.MeshCount(meshID) > 0 {
		return
	}
	r.mu.Lock()
	k := r.clocks[meshID]
	paused := k != nil && k.timer != nil
	if paused {
		k.paused = true
		k.stopLocked()
		r.markDirtyLocked(meshID)
	}
	r.mu.Unlock()
	if paused {
		r.log.Info("clock auto-paused", "mesh", meshID)
	}
}
