package protocol

import (
	"crypto/ed25519"
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"
)

func TestFormatJSNumber(t *testing.T) {
	for _, tt := range []struct {
		in   float64
		want string
	}{
		{0, "0"},
		{math.Copysign(0, -1), "0"},
		{1, "1"},
		{-1, "-1"},
		{100, "100"},
		{1746441115123, "1746441115123"},
		{0.1, "0.1"},
		{1.5, "1.5"},
		{1e21, "1e+21"},
		{1e20, "100000000000000000000"},
		{123456789012345680000, "123456789012345680000"},
		{1.2345678901234569e+23, "1.2345678901234569e+23"},
		{1e-7, "1e-7"},
		{0.000001, "0.000001"},
		{1.5e-7, "1.5e-7"},
		{12345678901234567890, "12345678901234567000"},
		{math.Inf(1), "Infinity"},
		{math.NaN(), "NaN"},
	} {
		if got := FormatJSNumber(tt.in); got != tt.want {
			t.Errorf("FormatJSNumber(%v) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestCanonicalStrings(t *testing.T) {
	pk := strings.Repeat("ab", 32)
	sk := strings.Repeat("cd", 32)
	if got := HelloSigningString("m_abc", "mem_1", pk, 1746441115123); got != "m_abc|mem_1|"+pk+"|1746441115123" {
		t.Errorf("hello: %q", got)
	}
	if got := SessionAttestString(pk, sk, 1746441115123); got != "claudemesh-session-attest|"+pk+"|"+sk+"|1746441115123" {
		t.Errorf("attest: %q", got)
	}
	if got := SessionHelloString("m", pk, sk, 5); got != "claudemesh-session-hello|m|"+pk+"|"+sk+"|5" {
		t.Errorf("session hello: %q", got)
	}
}

func TestSignVerify(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(nil)
	msg := HelloSigningString("m", "x", PubkeyHex(key), float64(time.Now().UnixMilli()))
	sig := Sign(key, msg)
	if ok, err := Verify(PubkeyHex(key), msg, sig); !ok || err != nil {
		t.Fatalf("own signature rejected: %v %v", ok, err)
	}
	if ok, err := Verify(strings.ToUpper(PubkeyHex(key)), msg, strings.ToUpper(sig)); !ok || err != nil {
		t.Fatalf("upper-case hex rejected: %v %v", ok, err)
	}
	if ok, _ := Verify(PubkeyHex(key), msg+"x", sig); ok {
		t.Fatal("signature over other bytes accepted")
	}
	if _, err := Verify("zz", msg, sig); err == nil {
		t.Fatal("undecodable key accepted")
	}
}

func TestDecodeHead(t *testing.T) {
	for _, tt := range []struct {
		name, in string
		want     Head
		wantErr  bool
	}{
		{"plain", `{"type":"send","id":"x1"}`, Head{Type: "send", ID: "x1"}, false},
		{"reqid", `{"type":"list_peers","_reqId":"r1"}`, Head{Type: "list_peers", ReqID: "r1"}, false},
		{"numeric id ignored", `{"type":"send","id":5}`, Head{Type: "send"}, false},
		{"no type", `{}`, Head{}, true},
		{"type not string", `{"type":5}`, Head{}, true},
		{"array", `[1,2]`, Head{}, true},
		{"not json", `hello`, Head{}, true},
		{"truncated", `{"type":"send"`, Head{}, true},
		{"bad utf8", "{\"type\":\"\xff\"}", Head{}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeHead([]byte(tt.in))
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("DecodeHead(%s) = %+v, %v", tt.in, got, err)
			}
			got2, send, err2 := DecodeHeadSend([]byte(tt.in))
			if got2 != got || (err2 == nil) != (err == nil) || (err2 == nil) != (send != nil) {
				t.Fatalf("DecodeHeadSend(%s) = %+v, %v, %v; DecodeHead gave %+v, %v", tt.in, got2, send, err2, got, err)
			}
		})
	}
}

// One pass of DecodeHeadSend fills the same send fields as Decode does.
func TestDecodeHeadSendMatchesDecode(t *testing.T) {
	in := []byte(`{"type":"send","id":"s1","_reqId":"r","targetSpec":"@dev","priority":"now","nonce":"bm9uY2U=","ciphertext":"Y2lwaGVy",` +
		`"client_message_id":"c1","request_fingerprint":"fp","replyToId":"m0","mentions":["a"],"bodyVersion":2,"extra":{"x":1}}`)
	h, got, err := DecodeHeadSend(in)
	if err != nil || h != (Head{Type: "send", ID: "s1", ReqID: "r"}) {
		t.Fatalf("head %+v, %v", h, err)
	}
	var want Send
	if err := Decode(in, &want); err != nil {
		t.Fatal(err)
	}
	gotJSON, _ := json.Marshal(got)
	wantJSON, _ := json.Marshal(want)
	if string(gotJSON) != string(wantJSON) {
		t.Fatalf("DecodeHeadSend filled %s, Decode %s", gotJSON, wantJSON)
	}
}

func TestRawNumberAndGroups(t *testing.T) {
	if _, ok := RawNumber(json.RawMessage(`"123"`)); ok {
		t.Error("string accepted as number")
	}
	if v, ok := RawNumber(json.RawMessage(`1746441115123`)); !ok || v != 1746441115123 {
		t.Error("number rejected")
	}
	g, ok := ParseGroups(json.RawMessage(`[{"name":"eng","role":"lead"},"junk",{"name":5},{"name":"ops"}]`))
	if !ok || len(g) != 2 || g[0] != (Group{"eng", "lead"}) || g[1] != (Group{Name: "ops"}) {
		t.Errorf("ParseGroups = %+v %v", g, ok)
	}
	if _, ok := ParseGroups(json.RawMessage(`"eng"`)); ok {
		t.Error("non-array groups counted as present")
	}
}

func TestEncodeLeavesHTMLAlone(t *testing.T) {
	f := MustEncode(NewError(CodeMalformed, "a<b>&c", Head{ReqID: "r"}))
	if string(f) != `{"type":"error","code":"malformed","message":"a<b>&c","_reqId":"r"}` {
		t.Fatalf("encoded %s", f)
	}
}

func TestNewUUID(t *testing.T) {
	u := NewUUID()
	if len(u) != 36 || u[14] != '4' || strings.Count(u, "-") != 4 {
		t.Fatalf("not a v4 uuid: %s", u)
	}
}

// FuzzDecode: no input makes frame decoding panic, whatever frame type it
// claims to be.
func FuzzDecode(f *testing.F) {
	for _, seed := range []string{
		`{"type":"hello","meshId":"m","memberId":"x","pubkey":"` + strings.Repeat("a", 64) + `","timestamp":1746441115123,"signature":"` + strings.Repeat("b", 128) + `","sessionId":"s1","pid":1,"cwd":"/"}`,
		`{"type":"session_hello","meshId":"m","parentAttestation":{"expiresAt":1},"groups":[{"name":"a"}]}`,
		`{"type":"send","id":"x1","targetSpec":"*","priority":"now","nonce":"","ciphertext":""}`,
		`{"type":"client_ack","brokerMessageId":"abc"}`,
		`{"type":"list_peers","_reqId":"r1"}`,
		`{"type":"set_visible","visible":"yes"}`,
		`not json`, `[]`, `{"type":null}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := DecodeHead(data)
		if err != nil {
			return
		}
		for _, v := range []any{&Hello{}, &SessionHello{}, &Send{}, &ClientAck{}, &Moderation{}, &SetVisible{}, &Attestation{}} {
			_ = Decode(data, v)
		}
		var hello Hello
		if Decode(data, &hello) == nil {
			RawNumber(hello.Timestamp)
			ParseGroups(hello.Groups)
			RawString(hello.SessionPubkey)
		}
		_ = h
	})
}
