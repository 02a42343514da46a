package services

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"syscall"
)

// The address guard of URL watches (R2). A watch fetches a URL its creator
// chose, with headers they chose, and reports what it found, so without a
// guard any mesh member could read the broker's internal network and the
// cloud metadata service. Unless cfg.WatchAllowPrivate, the dialer refuses
// every address in internalPrefixes. The check runs in the dialer's Control
// hook, on the IP actually being dialed after DNS resolution, so it covers
// every redirect hop and every address a name resolves to, and a name that
// resolves to a public address at watch time and a private one later (DNS
// rebinding) is still refused. No proxy is used: the guard must see the
// real destination.

// errRefusedAddress marks a dial the guard refused.
var errRefusedAddress = errors.New("address refused for URL watches")

// internalPrefixes are the addresses a watch may not reach. Cloud metadata
// services live in them: 169.254.169.254 (AWS, GCP, Azure; link-local),
// 100.100.100.200 (Alibaba; CGNAT), 192.0.0.192 (Oracle; IETF block) and
// fd00:ec2::254 (AWS IPv6; unique-local).
var internalPrefixes = []struct {
	prefix netip.Prefix
	kind   string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), "unspecified"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private"},
	{netip.MustParsePrefix("100.64.0.0/10"), "carrier-grade NAT"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private"},
	{netip.MustParsePrefix("192.0.0.0/24"), "IETF protocol assignment"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private"},
	{netip.MustParsePrefix("198.18.0.0/15"), "benchmarking"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved"},  // includes 255.255.255.255
	{netip.MustParsePrefix("::/96"), "IPv4-compatible"}, // includes :: and ::1
	{netip.MustParsePrefix("fc00::/7"), "unique-local"},
	{netip.MustParsePrefix("fe80::/10"), "link-local"},
	{netip.MustParsePrefix("fec0::/10"), "site-local"},
	{netip.MustParsePrefix("ff00::/8"), "multicast"},
}

// IPv6 ranges that carry an IPv4 destination inside the address: traffic to
// them ends up at that IPv4 address (through a NAT64 gateway, a 6to4 relay
// or a Teredo relay), so they are judged by the IPv4 rules too.
var (
	nat64     = netip.MustParsePrefix("64:ff9b::/96")   // RFC 6052: IPv4 in the last 32 bits
	nat64Site = netip.MustParsePrefix("64:ff9b:1::/48") // RFC 8215 local-use NAT64: a site's own translator
	sixToFour = netip.MustParsePrefix("2002::/16")      // RFC 3056: IPv4 in bits 16-47
	teredo    = netip.MustParsePrefix("2001::/32")      // RFC 4380: server IPv4 in bits 32-63, client IPv4 inverted in the last 32
)

// embeddedIPv4 returns the IPv4 addresses an IPv6 address a routes to by
// construction, with the name of the mechanism.
func embeddedIPv4(a netip.Addr) (mechanism string, v4 []netip.Addr) {
	b := a.As16()
	switch {
	case nat64.Contains(a):
		return "NAT64", []netip.Addr{netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})}
	case sixToFour.Contains(a):
		return "6to4", []netip.Addr{netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]})}
	case teredo.Contains(a):
		return "Teredo", []netip.Addr{
			netip.AddrFrom4([4]byte{b[4], b[5], b[6], b[7]}),
			netip.AddrFrom4([4]byte{^b[12], ^b[13], ^b[14], ^b[15]}),
		}
	}
	return "", nil
}

// internalKind names the internal range a belongs to, or "" for a public
// address. IPv4-mapped addresses are judged as IPv4; NAT64, 6to4 and Teredo
// addresses by every IPv4 address they embed as well as by themselves.
func internalKind(a netip.Addr) string {
	a = a.WithZone("").Unmap()
	if a.Is6() {
		if nat64Site.Contains(a) {
			return "local-use NAT64"
		}
		mechanism, v4 := embeddedIPv4(a)
		for _, e := range v4 {
			if kind := internalKind(e); kind != "" {
				return kind + " (via " + mechanism + ")"
			}
		}
	}
	for _, p := range internalPrefixes {
		if p.prefix.Contains(a) {
			return p.kind
		}
	}
	return ""
}

// refuseInternal is the default address policy (R2).
func refuseInternal(a netip.Addr) error {
	if kind := internalKind(a); kind != "" {
		return fmt.Errorf("%w: %s is %s", errRefusedAddress, a, kind)
	}
	return nil
}

// checkDialAddr is the dialer's Control hook: address is the "ip:port"
// being dialed.
func (r *Realtime) checkDialAddr(network, address string, _ syscall.RawConn) error {
	if r.addrPolicy == nil {
		return nil
	}
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("%w: unparsable dial address %q", errRefusedAddress, address)
	}
	return r.addrPolicy(ap.Addr())
}

// newWatchClient builds the HTTP client of watch checks: every dial goes
// through control, redirects stay on http/https and stop after 20, no
// proxy, no keep-alive (a check every few seconds gains nothing from an
// idle connection, and none is left behind at Close).
func newWatchClient(control func(network, address string, c syscall.RawConn) error) *http.Client {
	dialer := &net.Dialer{Timeout: watchFetchTimeout, Control: control}
	transport := &http.Transport{
		Proxy:                  nil,
		DialContext:            dialer.DialContext,
		DisableKeepAlives:      true,
		ForceAttemptHTTP2:      true,
		TLSHandshakeTimeout:    watchFetchTimeout,
		ResponseHeaderTimeout:  watchFetchTimeout,
		MaxResponseHeaderBytes: 64 << 10,
	}
	return &http.Client{
		Transport: transport,
		Timeout:   watchFetchTimeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= watchMaxRedirects {
				return fmt.Errorf("stopped after %d redirects", watchMaxRedirects)
			}
			if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
				return fmt.Errorf("redirect to unsupported scheme %q", req.URL.Scheme)
			}
			return nil
		},
	}
}

// checkTarget refuses a watch whose host is an internal address, or a name
// that resolves only to internal addresses, so the caller learns at once
// instead of watching a URL that can never be fetched. The dial-time guard
// remains the real protection; a name that does not resolve now is
// accepted (its checks fail until it does).
func (r *Realtime) checkTarget(ctx context.Context, host string) error {
	if r.addrPolicy == nil {
		return nil
	}
	if a, err := netip.ParseAddr(host); err == nil {
		return r.addrPolicy(a)
	}
	ctx, cancel := context.WithTimeout(ctx, watchLookupTimeout)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil || len(addrs) == 0 {
		return nil
	}
	var first error
	for _, a := range addrs {
		err := r.addrPolicy(a)
		if err == nil {
			return nil
		}
		if first == nil {
			first = err
		}
	}
	return fmt.Errorf("%s resolves only to refused addresses: %w", host, first)
}
