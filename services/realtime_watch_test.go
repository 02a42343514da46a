package services

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/config"
)

// Internal tests of the watch engine: the address guard, the values a
// body yields, the triggers, and the timer. The wire frames are tested end
// to end in the root package.

// rtNewRealtime builds a Realtime on a bare presence registry (no
// database): enough for watches, whose notifications to unknown presences
// are simply dropped.
func rtNewRealtime(t *testing.T, allowPrivate bool) *Realtime {
	t.Helper()
	cfg := config.Default()
	cfg.WatchAllowPrivate = allowPrivate
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	m := NewMetrics()
	p := NewPresenceService(cfg, nil, log, m, nil, nil, nil, nil, time.Now)
	r := NewRealtime(cfg, nil, log, m, time.Now, p, nil)
	t.Cleanup(r.Close)
	return r
}

// Issue 13 item 8: 6to4 and Teredo addresses reach the IPv4 address they
// embed, so they are refused when it is internal, like NAT64 and mapped
// ones.
func TestSSRFBlocks6to4AndTeredo(t *testing.T) {
	for _, tt := range []struct{ addr, kind string }{
		{"2002:7f00:1::", "loopback (via 6to4)"},                          // 127.0.0.1
		{"2002:a9fe:a9fe::1", "link-local (via 6to4)"},                    // 169.254.169.254
		{"2002:c0a8:0101:5::9", "private (via 6to4)"},                     // 192.168.1.1
		{"2002:0a00:0001::", "private (via 6to4)"},                        // 10.0.0.1
		{"2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback (via Teredo)"}, // client ^7f000001
		{"2001:0:a9fe:a9fe::1234", "link-local (via Teredo)"},             // server 169.254.169.254
		{"2001:0:4136:e378:8000:63bf:f5ff:fffe", "private (via Teredo)"},  // client ^0a000001
		{"64:ff9b::7f00:1", "loopback (via NAT64)"},
		{"64:ff9b:1::a9fe:a9fe", "local-use NAT64"},
		{"::ffff:169.254.169.254", "link-local"},
		{"2002:0808:0808::1", ""},                    // 6to4 of 8.8.8.8
		{"2001:0:4136:e378:8000:63bf:3fff:fdd2", ""}, // RFC 4380's example: server 65.54.227.120, client 192.0.2.45
		{"2001:db8::1", ""},
		{"64:ff9b::808:808", ""},
	} {
		if got := internalKind(netip.MustParseAddr(tt.addr)); got != tt.kind {
			t.Errorf("%s: %q, want %q", tt.addr, got, tt.kind)
		}
		if err := refuseInternal(netip.MustParseAddr(tt.addr)); (err != nil) != (tt.kind != "") {
			t.Errorf("%s: refuseInternal %v", tt.addr, err)
		}
	}
}

func TestInternalKind(t *testing.T) {
	for _, tt := range []struct{ addr, kind string }{
		{"127.0.0.1", "loopback"},
		{"127.255.0.9", "loopback"},
		{"::1", "IPv4-compatible"},
		{"::", "IPv4-compatible"},
		{"::ffff:127.0.0.1", "loopback"},
		{"::ffff:10.0.0.1", "private"},
		{"64:ff9b::a9fe:a9fe", "link-local (via NAT64)"}, // NAT64 of 169.254.169.254
		{"10.2.3.4", "private"},
		{"172.31.255.255", "private"},
		{"192.168.1.1", "private"},
		{"169.254.169.254", "link-local"},
		{"100.100.100.200", "carrier-grade NAT"},
		{"192.0.0.192", "IETF protocol assignment"},
		{"0.0.0.0", "unspecified"},
		{"224.0.0.1", "multicast"},
		{"255.255.255.255", "reserved"},
		{"fd00:ec2::254", "unique-local"},
		{"fe80::1%eth0", "link-local"},
		{"ff02::1", "multicast"},
		{"8.8.8.8", ""},
		{"172.32.0.1", ""},
		{"100.63.255.255", ""},
		{"2606:4700:4700::1111", ""},
		{"::ffff:8.8.8.8", ""},
	} {
		if got := internalKind(netip.MustParseAddr(tt.addr)); got != tt.kind {
			t.Errorf("%s: %q, want %q", tt.addr, got, tt.kind)
		}
	}
}

func TestWatchValue(t *testing.T) {
	long := strings.Repeat("é", 250)
	for _, tt := range []struct{ name, mode, extract, body, want string }{
		{"hash", "hash", "", "hello", "2cf24dba5fb0a30e"},
		{"json without extract hashes", "json", "", "hello", "2cf24dba5fb0a30e"},
		{"status path", "json", "$.status", `{"status":"ok"}`, "ok"},
		{"dollar only dot optional", "json", "$status", `{"status":"ok"}`, "ok"},
		{"no dollar", "json", "status", `{"status":"ok"}`, "ok"},
		{"nested and index", "json", "$.a.1.b", `{"a":[0,{"b":true}]}`, "true"},
		{"number js formatted", "json", "$.n", `{"n":1e21}`, "1e+21"},
		{"small number", "json", "$.n", `{"n":0.0000001}`, "1e-7"},
		{"integer", "json", "$.n", `{"n":100.0}`, "100"},
		{"missing", "json", "$.x.y", `{"a":1}`, "null"},
		{"null", "json", "$.a", `{"a":null}`, "null"},
		{"array joins", "json", "$.a", `{"a":[1,null,"x",[2,3]]}`, "1,,x,2,3"},
		{"object", "json", "$.a", `{"a":{"b":1}}`, "[object Object]"},
		{"bad index", "json", "$.a.01", `{"a":[1,2]}`, "null"},
		{"not json", "json", "$.a", "<html>", "<html>"},
		{"not json, first 200 characters", "json", "$.a", long, strings.Repeat("é", 200)},
	} {
		if got := watchValue(tt.mode, tt.extract, []byte(tt.body)); got != tt.want {
			t.Errorf("%s: %q, want %q", tt.name, got, tt.want)
		}
	}
}

func TestWatchNotifies(t *testing.T) {
	for _, tt := range []struct {
		on, old, cur string
		want         bool
	}{
		{"change", "a", "b", true},
		{"change", "a", "a", false},
		{"match:ok", "fail", "ok", true},
		{"match:ok", "ok", "ok", false},
		{"match:ok", "a", "b", false},
		{"not_match:ok", "ok", "fail", true},
		{"not_match:ok", "fail", "down", false},
		{"not_match:ok", "ok", "ok", false},
		{"always", "a", "b", false},
		{"changed", "a", "b", false},
		{"", "a", "b", false},
	} {
		if got := watchNotifies(tt.on, tt.old, tt.cur); got != tt.want {
			t.Errorf("%q %q->%q: %v", tt.on, tt.old, tt.cur, got)
		}
	}
}

func rtWatch(url, mode string) *watch {
	return &watch{id: "w_test", meshID: "m", presenceID: "p", memberID: "mem", url: url, mode: mode, notifyOn: "change",
		every: time.Hour, headers: map[string]string{}, createdAt: time.Now()}
}

// R2: the guard judges the address actually dialed, on every redirect hop
// and for every address a name resolves to. The "public" server here
// listens on 127.0.0.2 and is the one address the policy lets through; an
// internal service on 127.0.0.1 must stay out of reach.
func TestWatchGuardOnRedirectsAndNames(t *testing.T) {
	r := rtNewRealtime(t, false)
	var internalHits atomic.Int64
	internal := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		internalHits.Add(1)
		_, _ = w.Write([]byte("secret"))
	}))
	defer internal.Close()
	internalPort := netip.MustParseAddrPort(internal.Listener.Addr().String()).Port()

	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("no second loopback address: %v", err)
	}
	public := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		switch req.URL.Path {
		case "/to-loopback":
			http.Redirect(w, req, fmt.Sprintf("http://127.0.0.1:%d/", internalPort), http.StatusFound)
		case "/to-v6-loopback":
			http.Redirect(w, req, fmt.Sprintf("http://[::1]:%d/", internalPort), http.StatusFound)
		case "/to-name":
			http.Redirect(w, req, fmt.Sprintf("http://localhost:%d/", internalPort), http.StatusFound)
		case "/to-metadata":
			http.Redirect(w, req, "http://169.254.169.254/latest/meta-data/", http.StatusFound)
		case "/to-file":
			http.Redirect(w, req, "file:///etc/passwd", http.StatusFound)
		default:
			_, _ = w.Write([]byte("ok"))
		}
	}))
	public.Listener.Close()
	public.Listener = ln
	public.Start()
	defer public.Close()
	allowed := netip.MustParseAddr("127.0.0.2")
	r.addrPolicy = func(a netip.Addr) error {
		if a == allowed {
			return nil
		}
		return refuseInternal(a)
	}

	if v, err := r.fetchWatch(context.Background(), rtWatch(public.URL+"/plain", "status")); err != nil || v != "200" {
		t.Fatalf("allowed server: %q %v", v, err)
	}
	for _, path := range []string{"/to-loopback", "/to-v6-loopback", "/to-name", "/to-metadata"} {
		_, err := r.fetchWatch(context.Background(), rtWatch(public.URL+path, "hash"))
		if !errors.Is(err, errRefusedAddress) {
			t.Errorf("%s: %v, want the guard's refusal", path, err)
		}
	}
	if _, err := r.fetchWatch(context.Background(), rtWatch(public.URL+"/to-file", "hash")); err == nil || !strings.Contains(err.Error(), "unsupported scheme") {
		t.Errorf("redirect to file: %v", err)
	}
	// The default policy refuses a name that resolves to loopback at dial
	// time too (DNS rebinding: a watch-time check may have passed earlier).
	r.addrPolicy = refuseInternal
	if _, err := r.fetchWatch(context.Background(), rtWatch(fmt.Sprintf("http://localhost:%d/", internalPort), "hash")); !errors.Is(err, errRefusedAddress) {
		t.Errorf("localhost: %v", err)
	}
	if err := r.checkTarget(context.Background(), "localhost"); !errors.Is(err, errRefusedAddress) {
		t.Errorf("checkTarget(localhost): %v", err)
	}
	if n := internalHits.Load(); n != 0 {
		t.Fatalf("the internal service was reached %d times", n)
	}
}

// A body over the cap is a failed check, not a truncated value.
func TestWatchBodyCap(t *testing.T) {
	r := rtNewRealtime(t, true)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write(make([]byte, watchMaxBody+1))
	}))
	defer srv.Close()
	if _, err := r.fetchWatch(context.Background(), rtWatch(srv.URL, "hash")); !errors.Is(err, errBodyTooLarge) {
		t.Fatalf("oversize body: %v", err)
	}
	if v, err := r.fetchWatch(context.Background(), rtWatch(srv.URL, "status")); err != nil || v != "200" {
		t.Fatalf("status mode reads no body: %q %v", v, err)
	}
}

// The timer re-arms itself, and a tick while a check is in flight is
// skipped: a slow target never has two checks of one watch at once.
func TestWatchTimerSkipsWhileInFlight(t *testing.T) {
	r := rtNewRealtime(t, true)
	var inFlight, maxInFlight, hits atomic.Int64
	release := make(chan struct{})
	var once sync.Once
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			m := maxInFlight.Load()
			if n <= m || maxInFlight.CompareAndSwap(m, n) {
				break
			}
		}
		hits.Add(1)
		select {
		case <-release:
		case <-req.Context().Done():
		}
		_, _ = fmt.Fprint(w, hits.Load())
	}))
	defer srv.Close()
	defer once.Do(func() { close(release) })

	c := &Conn{PresenceID: "p1", MeshID: "m1", MemberID: "mem1"}
	ack, err := r.Watch(context.Background(), c, WatchRequest{URL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	w := r.watches[ack.WatchID]
	w.every = 10 * time.Millisecond // below the 5 s floor, for the test only
	w.timer.Reset(w.every)
	r.mu.Unlock()

	time.Sleep(150 * time.Millisecond) // ~15 ticks while the baseline hangs
	if h := hits.Load(); h != 1 {
		t.Fatalf("%d requests while the first was in flight", h)
	}
	once.Do(func() { close(release) })
	deadline := time.Now().Add(5 * time.Second)
	for hits.Load() < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("timer stopped after the slow check: %d requests", hits.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if m := maxInFlight.Load(); m != 1 {
		t.Fatalf("%d checks of one watch overlapped", m)
	}
	r.mu.Lock()
	last := w.lastValue
	r.mu.Unlock()
	if last == "" {
		t.Fatal("no value recorded")
	}

	// Unwatch stops the timer: no request after it.
	r.Unwatch(c, ack.WatchID)
	time.Sleep(30 * time.Millisecond) // a check started just before may finish
	n := hits.Load()
	time.Sleep(100 * time.Millisecond)
	if hits.Load() != n {
		t.Fatal("an unwatched watch kept polling")
	}
}

// R2: at most maxWatchesPerMesh watches per mesh, whoever creates them.
func TestWatchMeshCap(t *testing.T) {
	r := rtNewRealtime(t, true)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	defer srv.Close()
	for i := range maxWatchesPerMesh {
		c := &Conn{PresenceID: fmt.Sprint("p", i), MeshID: "m1", MemberID: fmt.Sprint("mem", i/maxWatchesPerMember)}
		if _, err := r.Watch(context.Background(), c, WatchRequest{URL: srv.URL}); err != nil {
			t.Fatalf("watch %d: %v", i, err)
		}
	}
	_, err := r.Watch(context.Background(), &Conn{PresenceID: "x", MeshID: "m1", MemberID: "new"}, WatchRequest{URL: srv.URL})
	if se, ok := AsError(err); !ok || se.Code != "limit_exceeded" {
		t.Fatalf("watch over the mesh cap: %v", err)
	}
	if _, err := r.Watch(context.Background(), &Conn{PresenceID: "y", MeshID: "m2", MemberID: "new"}, WatchRequest{URL: srv.URL}); err != nil {
		t.Fatalf("another mesh: %v", err)
	}
	// Eviction of one owner frees its share.
	r.onEvict(&Conn{PresenceID: "p0", MeshID: "m1", MemberID: "mem0"}, EvictKick)
	if _, err := r.Watch(context.Background(), &Conn{PresenceID: "x", MeshID: "m1", MemberID: "new"}, WatchRequest{URL: srv.URL}); err != nil {
		t.Fatalf("watch after an eviction: %v", err)
	}
}

func TestClockSpeedAndRelativeAgo(t *testing.T) {
	for _, tt := range []struct{ in, want float64 }{{0, 1}, {-5, 1}, {0.5, 1}, {2.5, 2.5}, {100, 100}, {1000, 100}} {
		if got := ClockSpeed(tt.in); got != tt.want {
			t.Errorf("ClockSpeed(%v) = %v", tt.in, got)
		}
	}
	for _, tt := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0s ago"}, {1499 * time.Millisecond, "1s ago"}, {1500 * time.Millisecond, "2s ago"}, {59 * time.Second, "59s ago"},
		{90 * time.Second, "2m ago"}, {59 * time.Minute, "59m ago"}, {150 * time.Minute, "3h ago"},
	} {
		if got := relativeAgo(tt.d); got != tt.want {
			t.Errorf("relativeAgo(%v) = %q, want %q", tt.d, got, tt.want)
		}
	}
}
