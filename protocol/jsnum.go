package protocol

import (
	"math"
	"strconv"
	"strings"
)

// FormatJSNumber renders v exactly as JavaScript's String(v) /
// Number.prototype.toString does (ECMA-262 Number::toString, radix 10).
// Canonical signing strings and the audit chain's canonical JSON both embed
// numbers in this form, so a Go formatting difference ("1e-07", "1e+21" vs
// "1e21") would break signatures and hashes.
func FormatJSNumber(v float64) string {
	switch {
	case math.IsNaN(v):
		return "NaN"
	case math.IsInf(v, 1):
		return "Infinity"
	case math.IsInf(v, -1):
		return "-Infinity"
	case v == 0: // also -0
		return "0"
	case v < 0:
		return "-" + FormatJSNumber(-v)
	}
	// Shortest round-trip digits and exponent: "d.ddde±XX".
	sci := strconv.FormatFloat(v, 'e', -1, 64)
	mant, expText, _ := strings.Cut(sci, "e")
	digits := strings.Replace(mant, ".", "", 1)
	exp, _ := strconv.Atoi(expText)
	k := len(digits)
	n := exp + 1 // position of the decimal point relative to the digits
	switch {
	case k <= n && n <= 21:
		return digits + strings.Repeat("0", n-k)
	case 0 < n && n <= 21:
		return digits[:n] + "." + digits[n:]
	case -6 < n && n <= 0:
		return "0." + strings.Repeat("0", -n) + digits
	}
	e := n - 1
	sign := "+"
	if e < 0 {
		sign, e = "-", -e
	}
	if k == 1 {
		return digits + "e" + sign + strconv.Itoa(e)
	}
	return digits[:1] + "." + digits[1:] + "e" + sign + strconv.Itoa(e)
}
