package protocol

import (
	"crypto/rand"
	"encoding/hex"
	"time"
)

// ISOLayout is JavaScript's Date.toISOString(): UTC, milliseconds, "Z".
const ISOLayout = "2006-01-02T15:04:05.000Z"

// ISO formats t the way every wire timestamp is formatted.
func ISO(t time.Time) string { return t.UTC().Format(ISOLayout) }

// NewUUID returns a random UUID v4 (lowercase, hyphenated), the messageId of
// system pushes.
func NewUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on supported platforms
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var out [36]byte
	hex.Encode(out[0:8], b[0:4])
	out[8] = '-'
	hex.Encode(out[9:13], b[4:6])
	out[13] = '-'
	hex.Encode(out[14:18], b[6:8])
	out[18] = '-'
	hex.Encode(out[19:23], b[8:10])
	out[23] = '-'
	hex.Encode(out[24:], b[10:])
	return string(out[:])
}

// IsLowerHex reports whether s is exactly n lowercase hex characters.
func IsLowerHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// IsHex reports whether s is exactly n hex characters of either case.
func IsHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}
