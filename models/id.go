package models

import "crypto/rand"

// idAlphabet is the reference's id alphabet: 62 symbols, [0-9A-Za-z].
const idAlphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// IDLength is the length of ids from NewID, as in the reference.
const IDLength = 32

// idByteLimit is the largest multiple of 62 that fits in a byte (4*62). Bytes
// at or above it are discarded: keeping them would make the first 8 symbols
// (256 mod 62) slightly more likely than the rest.
const idByteLimit = 4 * len(idAlphabet)

// NewID returns a fresh row id: 32 symbols drawn uniformly from [0-9A-Za-z]
// with crypto/rand (about 190 bits).
func NewID() string {
	var out [IDLength]byte
	// 48 bytes cover 32 symbols with room for the ~3% rejected bytes, so one
	// read nearly always suffices.
	var buf [48]byte
	n := 0
	for n < len(out) {
		// crypto/rand.Read never returns an error; it crashes the program
		// if the system generator fails.
		_, _ = rand.Read(buf[:])
		for _, b := range buf {
			if int(b) >= idByteLimit {
				continue
			}
			out[n] = idAlphabet[int(b)%len(idAlphabet)]
			n++
			if n == len(out) {
				break
			}
		}
	}
	return string(out[:])
}
