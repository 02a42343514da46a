package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/claudemesh/meshbroker/client"
	"github.com/claudemesh/meshbroker/config"
)

// CLIENT_IP_HEADER is the client address of every route that keys on one
// (handlers' clientAddr). These tests drive the hook routes' per-address
// limit through it from one socket, and the deprecated HOOK_CLIENT_IP_HEADER
// through config.Load and start.

// hookPoster posts hook reports over one kept-alive connection, so every
// request has the same socket peer, each with a new pid, so that the
// per-(pid, cwd) limit never refuses one and a 429 is the per-address one.
type hookPoster struct {
	t      *testing.T
	url    string
	header string // the header a request's address goes in
	http   *http.Client
	pid    atomic.Int64
	dials  atomic.Int64 // connections opened: one for the whole test
}

func newHookPoster(t *testing.T, b *testBroker, header string) *hookPoster {
	p := &hookPoster{t: t, url: b.httpURL("/hook/set-status"), header: header}
	p.pid.Store(40_000)
	var d net.Dialer
	tr := &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			p.dials.Add(1)
			return d.DialContext(ctx, network, addr)
		}}
	t.Cleanup(tr.CloseIdleConnections)
	p.http = &http.Client{Transport: tr}
	return p
}

// post sends one hook report with the header's values (none: no header)
// and returns the status code.
func (p *hookPoster) post(values ...string) int {
	p.t.Helper()
	pid := p.pid.Add(1)
	req, err := http.NewRequest("POST", p.url, strings.NewReader(fmt.Sprintf(`{"cwd":"/clientip/%d","pid":%d,"status":"working"}`, pid, pid)))
	if err != nil {
		p.t.Fatal(err)
	}
	for _, v := range values {
		req.Header.Add(p.header, v)
	}
	resp, err := p.http.Do(req)
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body) // read to the end, so the connection is reused
	if resp.StatusCode != 200 && !bytes.Contains(body, []byte("rate limited")) {
		p.t.Fatalf("hook from %q: %d %s", values, resp.StatusCode, body)
	}
	return resp.StatusCode
}

// expect posts once per wanted status and checks each.
func (p *hookPoster) expect(what string, want []int, values ...string) {
	p.t.Helper()
	for i, w := range want {
		if got := p.post(values...); got != w {
			p.t.Fatalf("%s, request %d from %q: %d, want %d", what, i+1, values, got, w)
		}
	}
}

// With CLIENT_IP_HEADER set, the hook routes' per-address bucket is the
// header's address, not the socket peer's: two addresses from one
// connection get a bucket each, and the forms of one address (a list whose
// last entry it is, with a port, IPv4-mapped) share its bucket.
func TestHookAddrLimitKeysOnClientIPHeader(t *testing.T) {
	t.Parallel()
	const perAddr = 3 // a bucket refills one token per 20 s: far beyond this test's few requests, even 10x slowed
	b := startTestBroker(t, func(c *config.Config) {
		c.ClientIPHeader = "X-Test-Client-Ip"
		c.HookAddrRateLimit = perAddr
	})
	p := newHookPoster(t, b, "X-Test-Client-Ip")
	full := []int{200, 200, 200, 429}

	p.expect("first address", full, "203.0.113.5")
	p.expect("second address, same socket", full, "198.51.100.9")
	// The nearest proxy's entry is the last: what a client put before it
	// does not buy it a bucket.
	p.expect("a list ending in the first address", []int{429}, "192.0.2.77, 203.0.113.5")
	p.expect("the header repeated, the first address last", []int{429}, "192.0.2.78", "203.0.113.5")
	p.expect("the first address with a port", []int{429}, "203.0.113.5:4711")
	p.expect("the first address IPv4-mapped", []int{429}, "::ffff:203.0.113.5")
	p.expect("a third address in last place", full, "203.0.113.5, 192.0.2.1")
	// Requests that carry no address share one bucket of their own: not the
	// peer's, which behind a proxy is every client's.
	p.expect("no header", full)
	p.expect("not an address", []int{429}, "unknown")

	if n := p.dials.Load(); n != 1 {
		t.Fatalf("%d connections, want every request on one socket", n)
	}
}

// An operator who set only the old HOOK_CLIENT_IP_HEADER keeps the setting:
// the broker warns at start to rename it, the hook routes key on it, and so
// do the member routes (which the old name did not reach).
func TestDeprecatedHookClientIPHeaderStillApplies(t *testing.T) {
	t.Parallel()
	loaded, err := config.Load(func(k string) string {
		return map[string]string{"HOOK_CLIENT_IP_HEADER": "X-Old-Client-IP"}[k]
	})
	if err != nil {
		t.Fatal(err)
	}
	b, logs := startLoggedBroker(t, "info", func(c *config.Config) {
		c.ClientIPHeader, c.Warnings = loaded.ClientIPHeader, loaded.Warnings
		c.HookAddrRateLimit = 2
	})
	warned := logs.logLines(t, "config warning")
	if len(warned) != 1 || warned[0]["level"] != "warn" || !strings.Contains(fmt.Sprint(warned[0]["detail"]), "rename it to CLIENT_IP_HEADER") {
		t.Fatalf("start logged %v, want one warning to rename HOOK_CLIENT_IP_HEADER", warned)
	}

	p := newHookPoster(t, b, "X-Old-Client-IP")
	p.expect("first address", []int{200, 200, 429}, "203.0.113.5")
	p.expect("second address, same socket", []int{200, 200, 429}, "198.51.100.9")

	f := b.fixture()
	b.connect(f.b, client.Options{Header: http.Header{"X-Old-Client-IP": {"203.0.113.7"}}})
	list := "/mesh/" + f.meshID + "/members"
	for _, c := range []struct {
		ip     string
		status int
	}{{"203.0.113.7", 200}, {"198.51.100.1", 401}} {
		h := http.Header{"X-Member-Id": {f.b.MemberID}, "X-Old-Client-IP": {c.ip}}
		if status, reply := memberRequest(t, b, nil, "GET", list, nil, h); status != c.status {
			t.Errorf("member route from %q: %d %v, want %d", c.ip, status, reply, c.status)
		}
	}
}

// Both names set to different headers: the broker does not pick one, it
// refuses to start and says why.
func TestClientIPHeaderConflictRefusesToStart(t *testing.T) {
	t.Parallel()
	env := map[string]string{"HOOK_CLIENT_IP_HEADER": "X-Forwarded-For", "CLIENT_IP_HEADER": "Fly-Client-IP"}
	var stderr bytes.Buffer
	if code := run(nil, func(k string) string { return env[k] }, io.Discard, &stderr); code != 1 {
		t.Fatalf("exit %d, want 1; stderr %s", code, stderr.String())
	}
	for _, want := range []string{"HOOK_CLIENT_IP_HEADER", "CLIENT_IP_HEADER", "disagree"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr %q does not say %q", stderr.String(), want)
		}
	}
}
