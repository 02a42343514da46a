package protocol

import (
	"bytes"
	"errors"
	"fmt"
)

// ErrUnstorableText is wrapped by every CheckStorableText error, so the edge
// can answer invalid_argument for it (H11).
var ErrUnstorableText = errors.New("text cannot be stored")

// CheckStorableText reports the first JSON string escape in data whose text
// no database column can hold: \u0000 (Postgres text and jsonb refuse NUL)
// or a UTF-16 surrogate escape that is not half of a pair (jsonb refuses it,
// and encoding/json would silently turn it into U+FFFD). The check is on the
// frame as received, before any field is decoded, so it is the same on
// SQLite and Postgres and a rejected frame has changed nothing. data must be
// valid JSON: then a backslash only ever starts an escape inside a string,
// and raw control bytes (a raw NUL included) cannot occur at all.
func CheckStorableText(data []byte) error {
	for {
		i := bytes.IndexByte(data, '\\')
		if i < 0 || i+1 >= len(data) {
			return nil
		}
		if data[i+1] != 'u' {
			data = data[i+2:] // \\, \", \n ...: the escaped byte cannot start another escape
			continue
		}
		r, ok := hex4(data[i+2:])
		if !ok {
			return nil // not valid JSON; the caller's parser has already said so
		}
		data = data[i+6:]
		switch {
		case r == 0:
			return fmt.Errorf("%w: a string contains \\u0000 (NUL)", ErrUnstorableText)
		case r >= 0xDC00 && r < 0xE000:
			return fmt.Errorf("%w: a string contains a lone UTF-16 low surrogate (\\u%04x)", ErrUnstorableText, r)
		case r >= 0xD800 && r < 0xDC00:
			if len(data) >= 6 && data[0] == '\\' && data[1] == 'u' {
				if low, ok := hex4(data[2:]); ok && low >= 0xDC00 && low < 0xE000 {
					data = data[6:]
					continue
				}
			}
			return fmt.Errorf("%w: a string contains a lone UTF-16 high surrogate (\\u%04x)", ErrUnstorableText, r)
		}
	}
}

// hex4 reads the four hex digits of a \u escape.
func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, c := range b[:4] {
		var d byte
		switch {
		case c >= '0' && c <= '9':
			d = c - '0'
		case c >= 'a' && c <= 'f':
			d = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, false
		}
		r = r<<4 | rune(d)
	}
	return r, true
}
