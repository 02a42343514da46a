package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"unicode/utf8"
)

// Head is what every inbound frame shares: its type and the correlation
// ids a reply must echo. Non-string ids are treated as absent.
type Head struct {
	Type  string
	ID    string
	ReqID string
}

// ErrNotObject is returned for a frame that is not one JSON object.
var ErrNotObject = errors.New("frame is not a JSON object")

type rawHead struct {
	Type  json.RawMessage `json:"type"`
	ID    json.RawMessage `json:"id"`
	ReqID json.RawMessage `json:"_reqId"`
}

// DecodeHead parses the frame far enough to dispatch it. The error says
// what is wrong, for an error frame with code malformed, except one that
// wraps ErrUnstorableText: that frame is well formed (its Head is filled)
// and gets invalid_argument.
func DecodeHead(data []byte) (Head, error) {
	var h rawHead
	return decodeHead(data, &h, &h)
}

// headAndSend is a frame parsed as a send and as a head at once.
type headAndSend struct {
	rawHead
	Send
}

// DecodeHeadSend is DecodeHead that also fills the fields of a send in the
// same pass. Every message is a send, and a send has no field that can fail
// to decode once the frame is valid JSON, so the hot path parses its frame
// once instead of twice. For other types the Send is simply not used.
func DecodeHeadSend(data []byte) (Head, *Send, error) {
	var f headAndSend
	h, err := decodeHead(data, &f, &f.rawHead)
	if err != nil {
		return h, nil, err
	}
	return h, &f.Send, nil
}

// decodeHead unmarshals data into dst, whose head fields are in raw.
func decodeHead(data []byte, dst any, raw *rawHead) (Head, error) {
	if !utf8.Valid(data) {
		return Head{}, errors.New("frame is not valid UTF-8")
	}
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return Head{}, ErrNotObject
	}
	if err := json.Unmarshal(trimmed, dst); err != nil {
		return Head{}, fmt.Errorf("invalid JSON: %w", err)
	}
	typ, ok := rawString(raw.Type)
	if !ok || typ == "" {
		return Head{}, errors.New("missing string field type")
	}
	id, _ := rawString(raw.ID)
	req, _ := rawString(raw.ReqID)
	h := Head{Type: typ, ID: id, ReqID: req}
	if err := CheckStorableText(trimmed); err != nil {
		return h, err // the head is known: the reply echoes its ids (H11)
	}
	return h, nil
}

// Decode fills v (a pointer to one of the inbound frame structs) from data.
// A type error names the field, for an invalid_argument reply.
func Decode(data []byte, v any) error {
	if err := json.Unmarshal(data, v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return fmt.Errorf("field %s must be %s, not %s", te.Field, jsonKind(te.Type.Kind().String()), te.Value)
		}
		return err
	}
	return nil
}

func jsonKind(goKind string) string {
	switch goKind {
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	case "slice", "array":
		return "an array"
	case "struct", "map":
		return "an object"
	case "float64", "int", "int64":
		return "a number"
	}
	return goKind
}

// rawString returns the string a raw JSON value holds, if it is a string.
func rawString(r json.RawMessage) (string, bool) {
	if len(r) == 0 || r[0] != '"' {
		return "", false
	}
	var s string
	if err := json.Unmarshal(r, &s); err != nil {
		return "", false
	}
	return s, true
}

// RawString is rawString for other packages: the string a raw JSON value
// holds, and whether it was one.
func RawString(r json.RawMessage) (string, bool) { return rawString(r) }

// RawNumber returns the finite number a raw JSON value holds. Strings,
// null and absent values are not numbers: a string timestamp is a skew
// rejection, not a coerced value.
func RawNumber(r json.RawMessage) (float64, bool) {
	r = bytes.TrimSpace(r)
	if len(r) == 0 || !(r[0] == '-' || r[0] >= '0' && r[0] <= '9') {
		return 0, false
	}
	f, err := strconv.ParseFloat(string(r), 64)
	if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, false
	}
	return f, true
}

// RawIsTrue reports whether a raw JSON value is the literal true.
func RawIsTrue(r json.RawMessage) bool { return string(bytes.TrimSpace(r)) == "true" }

// Group is one `{name, role?}` entry of a connection's groups.
type Group struct {
	Name string `json:"name"`
	Role string `json:"role,omitempty"`
}

// ParseGroups reads a client-supplied groups value leniently, as the
// reference does not validate it: entries that are not objects with a
// string name are skipped. present is false when the value is absent or
// not an array.
func ParseGroups(r json.RawMessage) (groups []Group, present bool) {
	r = bytes.TrimSpace(r)
	if len(r) == 0 || r[0] != '[' {
		return nil, false
	}
	var items []json.RawMessage
	if err := json.Unmarshal(r, &items); err != nil {
		return nil, false
	}
	groups = make([]Group, 0, len(items))
	for _, it := range items {
		var g struct {
			Name json.RawMessage `json:"name"`
			Role json.RawMessage `json:"role"`
		}
		if json.Unmarshal(it, &g) != nil {
			continue
		}
		name, ok := rawString(g.Name)
		if !ok {
			continue
		}
		role, _ := rawString(g.Role)
		groups = append(groups, Group{Name: name, Role: role})
	}
	return groups, true
}
