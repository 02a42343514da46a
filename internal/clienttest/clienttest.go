// Package clienttest gives this module's tests the hello and socket knobs
// that package client keeps off its public API: each function returns a
// copy of the options with one knob added, and the knobs compose.
//
//	opts := clienttest.Mutate(client.Options{Session: &sess}, func(m map[string]any) { delete(m, "signature") })
//	opts = clienttest.NoPong(opts)
//
// The knobs apply to every hello the client sends, reconnects included.
package clienttest

import (
	"maps"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/internal/clienthooks"
)

func attach(opts client.Options, edit func(*clienthooks.Hooks)) client.Options {
	return clienthooks.Attach(opts, edit).(client.Options)
}

// Mutate edits the signed hello frame just before it is sent. Several
// Mutate calls run in the order they were added.
func Mutate(opts client.Options, f func(map[string]any)) client.Options {
	return attach(opts, func(h *clienthooks.Hooks) {
		prev := h.Mutate
		if prev == nil {
			h.Mutate = f
			return
		}
		h.Mutate = func(m map[string]any) { prev(m); f(m) }
	})
}

// Extra sets hello fields after signing (so the signature does not cover
// them), e.g. a non-string sessionPubkey.
func Extra(opts client.Options, fields map[string]any) client.Options {
	return attach(opts, func(h *clienthooks.Hooks) {
		merged := maps.Clone(h.Extra)
		if merged == nil {
			merged = map[string]any{}
		}
		maps.Copy(merged, fields)
		h.Extra = merged
	})
}

// Omit leaves the named fields out of the hello (the SDK, for one, sends no
// cwd).
func Omit(opts client.Options, fields ...string) client.Options {
	return attach(opts, func(h *clienthooks.Hooks) {
		h.Omit = append(append([]string(nil), h.Omit...), fields...)
	})
}

// NoPong makes the client ignore the broker's pings, as a stalled process
// would, so the broker's watchdog terminates it.
func NoPong(opts client.Options) client.Options {
	return attach(opts, func(h *clienthooks.Hooks) { h.NoPong = true })
}
