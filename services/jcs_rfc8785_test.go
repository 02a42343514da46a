package services

import (
	"encoding/json"
	"math"
	"strconv"
	"testing"
)

// The examples RFC 8785 publishes, written out here from the RFC's text:
// Appendix B's IEEE 754 number table, §3.2.3's sorting example and §3.2.4's
// canonicalization example. (The RFC author's larger corpus is not
// reachable from this project's machines.)

// Appendix B: binary64 bit patterns and their canonical text; NaN and
// Infinity have none and must be refused.
func TestCanonicalJSONRFC8785NumberSamples(t *testing.T) {
	for _, tt := range []struct{ bits, want string }{
		{"0000000000000000", "0"},
		{"8000000000000000", "0"}, // minus zero
		{"0000000000000001", "5e-324"},
		{"8000000000000001", "-5e-324"},
		{"7fefffffffffffff", "1.7976931348623157e+308"},
		{"ffefffffffffffff", "-1.7976931348623157e+308"},
		{"4340000000000000", "9007199254740992"},
		{"c340000000000000", "-9007199254740992"},
		{"4430000000000000", "295147905179352830000"},
		{"44b52d02c7e14af5", "9.999999999999997e+22"},
		{"44b52d02c7e14af6", "1e+23"},
		{"44b52d02c7e14af7", "1.0000000000000001e+23"},
		{"444b1ae4d6e2ef4e", "999999999999999700000"},
		{"444b1ae4d6e2ef4f", "999999999999999900000"},
		{"444b1ae4d6e2ef50", "1e+21"},
		{"3eb0c6f7a0b5ed8c", "9.999999999999997e-7"},
		{"3eb0c6f7a0b5ed8d", "0.000001"},
		{"41b3de4355555553", "333333333.3333332"},
		{"41b3de4355555554", "333333333.33333325"},
		{"41b3de4355555555", "333333333.3333333"},
		{"41b3de4355555556", "333333333.3333334"},
		{"41b3de4355555557", "333333333.33333343"},
		{"becbf647612f3696", "-0.0000033333333333333333"},
		{"43143ff3c1cb0959", "1424953923781206.2"},
	} {
		u, err := strconv.ParseUint(tt.bits, 16, 64)
		if err != nil {
			t.Fatal(err)
		}
		f := math.Float64frombits(u)
		got, err := CanonicalJSON(f)
		if err != nil || string(got) != tt.want {
			t.Errorf("%s (%v): %q %v, want %q", tt.bits, f, got, err, tt.want)
		}
	}
	for _, bits := range []string{"7fffffffffffffff", "7ff0000000000000"} { // NaN, Infinity
		u, _ := strconv.ParseUint(bits, 16, 64)
		if got, err := CanonicalJSON(math.Float64frombits(u)); err == nil {
			t.Errorf("%s accepted as %q", bits, got)
		}
	}
}

// §3.2.3: properties sorted by their UTF-16 code units, given as JSON text
// with escapes, written as raw UTF-8.
func TestCanonicalJSONRFC8785SortingExample(t *testing.T) {
	in := `{
  "\u20ac": "Euro Sign",
  "\r": "Carriage Return",
  "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "1": "One",
  "\ud83d\ude00": "Emoji: Grinning Face",
  "\u0080": "Control",
  "\u00f6": "Latin Small Letter O With Diaeresis"
}`
	want := "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u0080\":\"Control\",\"\u00f6\":\"Latin Small Letter O With Diaeresis\"," +
		"\"\u20ac\":\"Euro Sign\",\"\U0001F600\":\"Emoji: Grinning Face\",\"\ufb33\":\"Hebrew Letter Dalet With Dagesh\"}"
	got, err := CanonicalJSON(json.RawMessage(in))
	if err != nil || string(got) != want {
		t.Fatalf("got  %s (%v)\nwant %s", got, err, want)
	}
}

// §3.2.4: the RFC's input document and its canonical form.
func TestCanonicalJSONRFC8785Example(t *testing.T) {
	in := `{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}`
	want := `{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}`
	got, err := CanonicalJSON(json.RawMessage(in))
	if err != nil || string(got) != want {
		t.Fatalf("got  %s (%v)\nwant %s", got, err, want)
	}
}
