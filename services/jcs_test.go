package services

import (
	"encoding/json"
	"math"
	"slices"
	"strings"
	"testing"
	"unicode/utf16"
)

func TestCanonicalJSON(t *testing.T) {
	negZero := math.Copysign(0, -1)
	type point struct {
		X int    `json:"x"`
		B string `json:"b"`
	}
	for _, tt := range []struct {
		name string
		in   any
		want string
	}{
		// literals
		{"null", nil, `null`},
		{"true", true, `true`},
		{"false", false, `false`},
		{"nil map is null", map[string]any(nil), `null`},
		{"nil slice is null", []any(nil), `null`},
		{"empty object", map[string]any{}, `{}`},
		{"empty array", []any{}, `[]`},

		// numbers: ECMAScript Number::toString of the float64 value
		{"integer float", 100.0, `100`},
		{"integer int", 100, `100`},
		{"negative zero", negZero, `0`},
		{"tenth", 0.1, `0.1`},
		{"one point five", -1.5, `-1.5`},
		{"1e21 uses exponent with plus", 1e21, `1e+21`},
		{"1e20 is plain", 1e20, `100000000000000000000`},
		{"1e-7 uses exponent", 1e-7, `1e-7`},
		{"1e-6 is plain", 0.000001, `0.000001`},
		{"long mantissa exponent", 1.2345678901234569e+23, `1.2345678901234569e+23`},
		{"smallest subnormal", 5e-324, `5e-324`},
		{"largest float", math.MaxFloat64, `1.7976931348623157e+308`},
		{"uint64 through float64", uint64(12345678901234567890), `12345678901234567000`},
		{"json.Number through float64", json.Number("12345678901234567890"), `12345678901234567000`},
		{"json.Number exponent", json.Number("1E21"), `1e+21`},
		{"json.Number trailing zeros", json.Number("1.50"), `1.5`},
		{"json.Number negative zero", json.Number("-0.0"), `0`},
		{"int64 max rounds", int64(math.MaxInt64), `9223372036854776000`},
		{"float32 widened", float32(0.5), `0.5`},

		// strings: only the listed escapes, everything else raw UTF-8
		{"html characters raw", "k<&>é", `"k<&>é"`},
		{"line separators raw", "a\u2028b\u2029c", "\"a\u2028b\u2029c\""},
		{"short escapes", "\"\\\b\t\n\f\r", `"\"\\\b\t\n\f\r"`},
		{"other controls as lowercase u00xx", "\x00\x01\x0b\x1f", `"\u0000\u0001\u000b\u001f"`},
		{"DEL and slash raw", "\x7f/", "\"\x7f/\""},
		{"non-BMP raw", "😀", `"😀"`},
		{"invalid UTF-8 becomes U+FFFD", "a\xffb", "\"a\uFFFDb\""},

		// objects: keys sorted by UTF-16 code units, recursively
		{"keys sorted", map[string]any{"b": 1, "a": 2, "aa": 3, "B": 4}, `{"B":4,"a":2,"aa":3,"b":1}`},
		{"non-BMP key before U+E000..U+FFFF keys", map[string]any{"\uffff": 3, "\ue000": 2, "😀": 1, "z": 0},
			"{\"z\":0,\"😀\":1,\"\ue000\":2,\"\uffff\":3}"},
		// RFC 8785 §3.2.3's sorting example.
		{"rfc 8785 sort example", map[string]any{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
			"1": "One", "😀": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"},
			"{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u0080\":\"Control\",\"ö\":\"Latin Small Letter O With Diaeresis\"," +
				"\"€\":\"Euro Sign\",\"😀\":\"Emoji: Grinning Face\",\"\ufb33\":\"Hebrew Letter Dalet With Dagesh\"}"},
		{"non-ASCII keys", map[string]any{"é": true, "e": false, "ß": 1, "z": nil}, `{"e":false,"z":null,"ß":1,"é":true}`},
		{"key escapes", map[string]any{"a\"b": 1, "\n": 2}, `{"\n":2,"a\"b":1}`},
		{"nested", map[string]any{
			"z": []any{map[string]any{"y": 1, "x": []any{}}, "s", nil},
			"a": map[string]any{"d": map[string]any{"c": false, "b": 0.5}},
		}, `{"a":{"d":{"b":0.5,"c":false}},"z":[{"x":[],"y":1},"s",null]}`},
		{"groups as []map", map[string]any{"groups": []map[string]any{{"role": "lead", "name": "dev"}, {"name": "ops"}}},
			`{"groups":[{"name":"dev","role":"lead"},{"name":"ops"}]}`},

		// decoded and foreign values
		{"raw message reordered with whitespace", json.RawMessage(" { \"b\" : [1E21, -0, 1.0] ,\n \"a\":\"\\u2028\\/\" } "), "{\"a\":\"\u2028/\",\"b\":[1e+21,0,1]}"},
		{"typed slice via encoding/json", []string{"x", "<y>"}, `["x","<y>"]`},
		{"struct via encoding/json", point{X: 1, B: "&"}, `{"b":"&","x":1}`},
		{"map of strings via encoding/json", map[string]string{"b": "1", "a": "2"}, `{"a":"2","b":"1"}`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := CanonicalJSON(tt.in)
			if err != nil {
				t.Fatalf("CanonicalJSON: %v", err)
			}
			if string(got) != tt.want {
				t.Errorf("got  %s\nwant %s", got, tt.want)
			}
		})
	}
}

// What json.Unmarshal gives back from a stored payload canonicalizes to the
// same text as the Go value that was stored.
func TestCanonicalJSONRoundTripsThroughDecoding(t *testing.T) {
	in := map[string]any{
		"key":   "k<&>é\u2028",
		"value": map[string]any{"z": 1.5, "a": []any{1e21, math.Copysign(0, -1), 0.1, 100, "\u0001\n"}, "m": nil, "é": true, "b": 1e-7},
		"big":   json.Number("12345678901234567890"),
		"😀":     []map[string]any{{"\ue000": 1}},
	}
	want, err := CanonicalJSON(in)
	if err != nil {
		t.Fatal(err)
	}
	var plain any
	if err := json.Unmarshal(want, &plain); err != nil {
		t.Fatalf("canonical text is not JSON: %v\n%s", err, want)
	}
	numbers, err := decodeJSONUseNumber(want)
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]any{"float64": plain, "UseNumber": numbers, "RawMessage": json.RawMessage(want)} {
		got, err := CanonicalJSON(v)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if string(got) != string(want) {
			t.Errorf("%s: got %s, want %s", name, got, want)
		}
	}
}

func TestCanonicalJSONErrors(t *testing.T) {
	for _, tt := range []struct {
		name string
		in   any
	}{
		{"NaN", math.NaN()},
		{"Inf", map[string]any{"x": math.Inf(1)}},
		{"number beyond float64", json.Number("1e400")},
		{"not a number", json.Number("abc")},
		{"raw invalid", json.RawMessage(`{"a":`)},
		{"raw trailing data", json.RawMessage(`{} {}`)},
		{"unmarshalable", map[string]any{"c": make(chan int)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got, err := CanonicalJSON(tt.in); err == nil {
				t.Errorf("got %s, want an error", got)
			}
		})
	}
}

// compareUTF16 agrees with a sort of the UTF-16 encodings.
func TestCanonicalKeyOrderMatchesUTF16(t *testing.T) {
	alphabet := []string{"", "a", "z", "\u007f", "\u0080", "é", "\u2028", "\ud7ff", "\ue000", "\uffef", "\uffff", "𐀀", "😀", "😁", "\U0010ffff"}
	var keys []string
	for _, x := range alphabet {
		for _, y := range alphabet {
			keys = append(keys, x+y)
		}
	}
	units := func(s string) []uint16 { return utf16.Encode([]rune(s)) }
	for _, a := range keys {
		for _, b := range keys {
			want := slices.Compare(units(a), units(b))
			got := compareUTF16(a, b)
			if auditSign(got) != want {
				t.Fatalf("compareUTF16(%+q, %+q) = %d, want sign %d", a, b, got, want)
			}
		}
	}
	// And Go's byte order really does differ, which is the point.
	if strings.Compare("😀", "\ue000") != 1 || compareUTF16("😀", "\ue000") >= 0 {
		t.Fatal("expected U+1F600 after U+E000 in bytes and before it in UTF-16")
	}
}

func auditSign(n int) int {
	switch {
	case n < 0:
		return -1
	case n > 0:
		return 1
	}
	return 0
}
