package protocol

import (
	"bytes"
	"encoding/json"
)

// Frame is one encoded outbound message: the exact bytes of a text frame.
// A multicast encodes once and hands the same Frame to every recipient.
type Frame []byte

// Encode marshals v without HTML escaping (the reference's JSON.stringify
// leaves <, > and & alone) and without a trailing newline.
func Encode(v any) (Frame, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return Frame(b[:len(b)-1]), nil
}

// MustEncode is Encode for values that cannot fail to marshal (the
// protocol's own structs with plain fields).
func MustEncode(v any) Frame {
	f, err := Encode(v)
	if err != nil {
		panic("protocol: encode " + err.Error())
	}
	return f
}

// ErrorFrame is `{"type":"error","code","message","id"?,"_reqId"?}`.
type ErrorFrame struct {
	Type    string `json:"type"`
	Code    Code   `json:"code"`
	Message string `json:"message"`
	ID      string `json:"id,omitempty"`
	ReqID   string `json:"_reqId,omitempty"`
}

// NewError builds an error frame echoing the request's ids.
func NewError(code Code, message string, h Head) ErrorFrame {
	return ErrorFrame{Type: "error", Code: code, Message: message, ID: h.ID, ReqID: h.ReqID}
}
