package client

// Priority is a message's delivery priority, the send frame's `priority`
// (02 §3). The broker holds a message until the recipient connection's
// status takes it: idle takes all three, working and dnd take only
// PriorityNow. Within what a status takes, delivery is first in, first out.
type Priority string

// The wire values.
const (
	PriorityNow  Priority = "now"  // delivered whatever the recipient's status
	PriorityNext Priority = "next" // delivered when the recipient is idle; the broker's default
	PriorityLow  Priority = "low"  // delivered when the recipient is idle
)

// Valid reports whether p is one of the three wire values. The empty
// Priority is not valid but is allowed in a send: the field is left out and
// the broker stores PriorityNext.
func (p Priority) Valid() bool {
	return p == PriorityNow || p == PriorityNext || p == PriorityLow
}

// String returns the wire value.
func (p Priority) String() string { return string(p) }
