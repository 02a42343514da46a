package services

import (
	"crypto/ed25519"
	"encoding/hex"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func signedHello(t *testing.T, key ed25519.PrivateKey, ts int64) (string, float64, string) {
	t.Helper()
	pub := hex.EncodeToString(key.Public().(ed25519.PublicKey))
	sig := hex.EncodeToString(ed25519.Sign(key, []byte(pub+"|"+time.UnixMilli(ts).String())))
	return pub, float64(ts), sig
}

// A hello is accepted once inside the window, whatever the hex case, and
// again only after its window (when the skew check refuses it anyway).
func TestHelloReplaysOncePerWindow(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(nil)
	now := time.UnixMilli(1_800_000_000_000)
	r := newHelloReplays(time.Minute, 16)
	pub, ts, sig := signedHello(t, key, now.UnixMilli())
	if !r.firstUse(pub, ts, sig, now) {
		t.Fatal("first use refused")
	}
	if r.firstUse(pub, ts, sig, now.Add(59*time.Second)) || r.firstUse(strings.ToUpper(pub), ts, strings.ToUpper(sig), now) {
		t.Fatal("replay inside the window accepted")
	}
	if _, ts2, sig2 := signedHello(t, key, now.UnixMilli()+1); !r.firstUse(pub, ts2, sig2, now) {
		t.Fatal("a fresh timestamp of the same key refused")
	}
	if !r.firstUse(pub, ts, sig, now.Add(time.Minute+2*time.Millisecond)) {
		t.Fatal("entry kept past its window")
	}
}

// The cache never holds more than its bound, expired entries go first, and
// concurrent users agree on exactly one first use of each hello.
func TestHelloReplaysBoundedAndConcurrent(t *testing.T) {
	now := time.UnixMilli(1_800_000_000_000)
	r := newHelloReplays(time.Minute, 100)
	_, key, _ := ed25519.GenerateKey(nil)
	for i := range 1000 {
		pub, ts, sig := signedHello(t, key, now.UnixMilli()-int64(i))
		r.firstUse(pub, ts, sig, now)
		if r.size() > 100 {
			t.Fatalf("%d entries, bound 100", r.size())
		}
	}
	// A minute on, all of them have expired and the next call drops them.
	pub, ts, sig := signedHello(t, key, now.Add(2*time.Minute).UnixMilli())
	r.firstUse(pub, ts, sig, now.Add(2*time.Minute))
	if r.size() != 1 {
		t.Fatalf("%d entries after expiry, want 1", r.size())
	}

	later := now.Add(2 * time.Minute)
	hellos := make([][3]any, 50)
	for i := range hellos {
		p, ts, s := signedHello(t, key, later.UnixMilli()+int64(1+i))
		hellos[i] = [3]any{p, ts, s}
	}
	var wins atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for _, h := range hellos {
				if r.firstUse(h[0].(string), h[1].(float64), h[2].(string), later) {
					wins.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if wins.Load() != int64(len(hellos)) {
		t.Fatalf("%d first uses for %d hellos", wins.Load(), len(hellos))
	}
}
