package services

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"slices"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/claudemesh/meshbroker/protocol"
)

// CanonicalJSON renders v as RFC 8785 (JCS) canonical JSON, the text the
// audit chain hashes (04 §1.3). It must match the reference broker byte for
// byte (A1), which is why it does not use encoding/json's encoder: that one
// escapes <, >, & and U+2028/U+2029 and formats numbers the Go way.
//
// v may hold nil, bool, string, any Go integer or float, json.Number,
// json.RawMessage (decoded, then canonicalized), map[string]any,
// []any and []map[string]any, nested freely. Any other type is
// marshalled with encoding/json first and the result canonicalized, so
// structs and typed slices work too. A nil map or slice is null, as
// encoding/json has it. Every number is converted to float64
// before it is formatted, exactly as JavaScript sees it:
// 12345678901234567890 becomes 12345678901234567000. NaN and ±Inf have no
// JSON form and are an error.
//
// Invalid UTF-8 in a string is written as U+FFFD, as encoding/json does, so
// that the text that is hashed is also the text the database stores.
func CanonicalJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	if err := appendCanonical(&buf, v, 0); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// jsUndefined canonicalizes as the bare word `undefined`: what the
// reference's insert-time text holds for a message_sent row without a
// priority (04 §1.3, A1b). It is never written; Verify uses it to reproduce
// such a row's stored hash.
type jsUndefined struct{}

// maxCanonicalDepth bounds recursion; audit payloads are a few levels deep,
// and a cyclic map would otherwise overflow the stack.
const maxCanonicalDepth = 64

var errCanonicalTooDeep = errors.New("canonical json: nesting deeper than 64 levels")

func appendCanonical(buf *bytes.Buffer, v any, depth int) error {
	if depth > maxCanonicalDepth {
		return errCanonicalTooDeep
	}
	switch x := v.(type) {
	case nil:
		buf.WriteString("null")
	case jsUndefined:
		buf.WriteString("undefined")
	case bool:
		if x {
			buf.WriteString("true")
		} else {
			buf.WriteString("false")
		}
	case string:
		appendCanonicalString(buf, x)
	case float64:
		return appendCanonicalNumber(buf, x)
	case float32:
		return appendCanonicalNumber(buf, float64(x))
	case int:
		return appendCanonicalNumber(buf, float64(x))
	case int8:
		return appendCanonicalNumber(buf, float64(x))
	case int16:
		return appendCanonicalNumber(buf, float64(x))
	case int32:
		return appendCanonicalNumber(buf, float64(x))
	case int64:
		return appendCanonicalNumber(buf, float64(x))
	case uint:
		return appendCanonicalNumber(buf, float64(x))
	case uint8:
		return appendCanonicalNumber(buf, float64(x))
	case uint16:
		return appendCanonicalNumber(buf, float64(x))
	case uint32:
		return appendCanonicalNumber(buf, float64(x))
	case uint64:
		return appendCanonicalNumber(buf, float64(x))
	case json.Number:
		// ParseFloat rounds to nearest like JavaScript's parser; a value out
		// of float64 range comes back as ±Inf, which appendCanonicalNumber refuses.
		f, err := strconv.ParseFloat(string(x), 64)
		if err != nil && !errors.Is(err, strconv.ErrRange) {
			// The number itself stays out of the error: it may be user data.
			return errors.New("canonical json: invalid json.Number")
		}
		return appendCanonicalNumber(buf, f)
	case json.RawMessage:
		decoded, err := decodeJSONUseNumber(x)
		if err != nil {
			return err
		}
		return appendCanonical(buf, decoded, depth)
	case map[string]any:
		if x == nil {
			buf.WriteString("null") // as encoding/json has it
			return nil
		}
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		slices.SortFunc(keys, compareUTF16)
		buf.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				buf.WriteByte(',')
			}
			appendCanonicalString(buf, k)
			buf.WriteByte(':')
			if err := appendCanonical(buf, x[k], depth+1); err != nil {
				return err
			}
		}
		buf.WriteByte('}')
	case []any:
		if x == nil {
			buf.WriteString("null")
			return nil
		}
		buf.WriteByte('[')
		for i, e := range x {
			if i > 0 {
				buf.WriteByte(',')
			}
			if err := appendCanonical(buf, e, depth+1); err != nil {
				return err
			}
		}
		buf.WriteByte(']')
	case []map[string]any:
		if x == nil {
			buf.WriteString("null")
			return nil
		}
		buf.WriteByte('[')
		for i, e := range x {
			if i > 0 {
				buf.WriteByte(',')
			}
			if err := appendCanonical(buf, e, depth+1); err != nil {
				return err
			}
		}
		buf.WriteByte(']')
	default:
		// A nil pointer, map or slice is JSON null, as encoding/json has it.
		if rv := reflect.ValueOf(v); (rv.Kind() == reflect.Pointer || rv.Kind() == reflect.Map || rv.Kind() == reflect.Slice) && rv.IsNil() {
			buf.WriteString("null")
			return nil
		}
		// Anything else (structs, []string, map[string]string, Marshalers)
		// goes through its ordinary JSON form, then the rules above.
		raw, err := json.Marshal(v)
		if err != nil {
			// Only the type: encoding/json's message can quote the value.
			return fmt.Errorf("canonical json: cannot marshal %T", v)
		}
		return appendCanonical(buf, json.RawMessage(raw), depth)
	}
	return nil
}

// decodeJSONUseNumber parses one JSON value, keeping numbers as json.Number
// so that the one float64 conversion happens in appendCanonical.
func decodeJSONUseNumber(raw []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		// encoding/json's syntax errors name a character and an offset,
		// never a whole value.
		return nil, fmt.Errorf("canonical json: decode: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("canonical json: decode: trailing data after the value")
	}
	return v, nil
}

func appendCanonicalNumber(buf *bytes.Buffer, f float64) error {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return errors.New("canonical json: NaN and Infinity have no JSON form")
	}
	buf.WriteString(protocol.FormatJSNumber(f))
	return nil
}

const hexDigits = "0123456789abcdef"

// appendCanonicalString writes s quoted with JSON.stringify's escapes: the
// two-character forms for " \ \b \t \n \f \r, \u00xx for the other control
// characters, and every other code point as raw UTF-8.
func appendCanonicalString(buf *bytes.Buffer, s string) {
	buf.WriteByte('"')
	for i := 0; i < len(s); {
		c := s[i]
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && size == 1 {
				buf.WriteString("\uFFFD")
			} else {
				buf.WriteString(s[i : i+size])
			}
			i += size
			continue
		}
		switch c {
		case '"':
			buf.WriteString(`\"`)
		case '\\':
			buf.WriteString(`\\`)
		case '\b':
			buf.WriteString(`\b`)
		case '\t':
			buf.WriteString(`\t`)
		case '\n':
			buf.WriteString(`\n`)
		case '\f':
			buf.WriteString(`\f`)
		case '\r':
			buf.WriteString(`\r`)
		default:
			if c < 0x20 {
				buf.WriteString(`\u00`)
				buf.WriteByte(hexDigits[c>>4])
				buf.WriteByte(hexDigits[c&0xf])
			} else {
				buf.WriteByte(c)
			}
		}
		i++
	}
	buf.WriteByte('"')
}

// compareUTF16 orders strings by their UTF-16 code units, as JavaScript's
// sort does (RFC 8785 §3.2.3). It differs from Go's byte order only where
// a character above U+FFFF (a surrogate pair, 0xD800–0xDBFF first) meets
// one in U+E000–U+FFFF: UTF-16 sorts the former first, UTF-8 the latter.
func compareUTF16(a, b string) int {
	for a != "" && b != "" {
		ra, na := utf8.DecodeRuneInString(a)
		rb, nb := utf8.DecodeRuneInString(b)
		if ra != rb {
			ua, ub := firstUTF16Unit(ra), firstUTF16Unit(rb)
			if ua != ub {
				return int(ua) - int(ub)
			}
			// Both are surrogate pairs with the same high half; the low
			// halves, and so the code points, decide.
			return int(ra) - int(rb)
		}
		a, b = a[na:], b[nb:]
	}
	return len(a) - len(b)
}

func firstUTF16Unit(r rune) uint16 {
	if r >= 0x10000 {
		hi, _ := utf16.EncodeRune(r)
		return uint16(hi)
	}
	return uint16(r)
}
