package services

import (
	"errors"

	"github.com/claudemesh/meshbroker/protocol"
)

// Error is an application error with a protocol code and a message the
// client may see. Anything else a service returns is internal: the edge
// logs it and answers with code internal.
type Error struct {
	Code protocol.Code
	Msg  string
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Msg }

// Errorf is a shorthand for an *Error.
func newError(code protocol.Code, msg string) *Error { return &Error{Code: code, Msg: msg} }

// AsError returns the *Error inside err, if any.
func AsError(err error) (*Error, bool) {
	var e *Error
	ok := errors.As(err, &e)
	return e, ok
}
