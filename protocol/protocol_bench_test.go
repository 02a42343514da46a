package protocol

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"testing"
)

// Benchmarks of the per-frame work on the hot path: decoding a send,
// encoding a push, verifying a hello signature. Run with
//
//	go test ./protocol -run '^$' -bench . -benchmem

// benchSendFrame is a send as the SDK writes it, with a crypto_box-sized
// body (96 plaintext bytes + 16 bytes of tag, base64).
func benchSendFrame(b *testing.B) []byte {
	b.Helper()
	nonce := make([]byte, 24)
	ct := make([]byte, 112)
	_, _ = rand.Read(nonce)
	_, _ = rand.Read(ct)
	_, target, _ := ed25519.GenerateKey(nil)
	f, err := json.Marshal(map[string]any{
		"type": "send", "id": "s42-9f3a1c2b", "targetSpec": PubkeyHex(target), "priority": "now",
		"nonce": base64.StdEncoding.EncodeToString(nonce), "ciphertext": base64.StdEncoding.EncodeToString(ct),
	})
	if err != nil {
		b.Fatal(err)
	}
	return f
}

// BenchmarkDecodeSend is what the edge does with every send frame before
// the service sees it: DecodeHead to dispatch, then Decode into Send.
func BenchmarkDecodeHeadSend(b *testing.B) {
	data := benchSendFrame(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		h, s, err := DecodeHeadSend(data)
		if err != nil || h.Type != "send" || len(s.Ciphertext) == 0 {
			b.Fatal(h, err)
		}
	}
}

// BenchmarkDecodeSend is the two-pass decode a non-send frame gets.
func BenchmarkDecodeSend(b *testing.B) {
	data := benchSendFrame(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		h, err := DecodeHead(data)
		if err != nil || h.Type != "send" {
			b.Fatal(h, err)
		}
		var s Send
		if err := Decode(data, &s); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEncodePush is one drained push frame (02 §6.1).
func BenchmarkEncodePush(b *testing.B) {
	nonce := make([]byte, 24)
	ct := make([]byte, 112)
	_, _ = rand.Read(nonce)
	_, _ = rand.Read(ct)
	_, key, _ := ed25519.GenerateKey(nil)
	p := Push{
		Type: "push", MessageID: "0123456789ABCDEFGHIJKLMNOPQRSTUV", MeshID: "abcdefghijklmnopqrstuvwxyz012345",
		SenderPubkey: PubkeyHex(key), Priority: "now", Nonce: base64.StdEncoding.EncodeToString(nonce),
		Ciphertext: base64.StdEncoding.EncodeToString(ct), CreatedAt: "2026-05-05T11:31:55.123Z",
	}
	b.ReportAllocs()
	var n int
	for b.Loop() {
		n = len(MustEncode(p))
	}
	b.SetBytes(int64(n))
}

// BenchmarkVerifyHello is the signature check of a member hello (01 §2.2):
// hex-decode key and signature, build the signing string, ed25519.Verify.
func BenchmarkVerifyHello(b *testing.B) {
	_, key, _ := ed25519.GenerateKey(nil)
	pub := PubkeyHex(key)
	const mesh, member, ts = "abcdefghijklmnopqrstuvwxyz012345", "0123456789ABCDEFGHIJKLMNOPQRSTUV", 1746441115123
	sig := Sign(key, HelloSigningString(mesh, member, pub, ts))
	b.ReportAllocs()
	for b.Loop() {
		ok, err := Verify(pub, HelloSigningString(mesh, member, pub, ts), sig)
		if err != nil || !ok {
			b.Fatal(ok, err)
		}
	}
}
