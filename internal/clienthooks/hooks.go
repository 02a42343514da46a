// Package clienthooks carries the test-only knobs of package client (hello
// edits, a socket that never answers pings) without putting them on the
// public client.Options. Package client stores a *Hooks in an unexported
// Options field and installs Attach at init; tests reach it through
// internal/clienttest. Being internal, neither package is visible to users
// outside this module.
package clienthooks

// Hooks are the knobs. The zero value changes nothing.
type Hooks struct {
	// Extra hello fields, set after the client has built and signed the
	// frame (so they are not covered by the signature).
	Extra map[string]any
	// Omit lists hello fields to delete (after Extra).
	Omit []string
	// Mutate edits the hello frame last. A client with Mutate set does not
	// re-sign and retry a hello the broker refused as replayed: tests that
	// set it mean the exact frame they built.
	Mutate func(map[string]any)
	// NoPong makes the client ignore pings, as a stalled process would.
	NoPong bool
}

// Attach returns a copy of opts (a client.Options) whose hooks are edited
// by edit, which receives the hooks already attached (or zero ones).
// Package client sets it in its init function; it is nil until client is
// linked in, which every importer of internal/clienttest guarantees.
var Attach func(opts any, edit func(*Hooks)) any
