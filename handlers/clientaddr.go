package handlers

import (
	"net/http"
	"net/netip"
	"strings"
)

// clientAddr is the request's client address, the one thing every route
// that keys on the caller's address reads (the hook routes' per-address
// limit, the member routes' live-session proof, the address a socket
// records for that proof): the TCP peer, or, with CLIENT_IP_HEADER, the
// address a trusted proxy put in that header, since behind a proxy every
// peer is the proxy. Of a list (X-Forwarded-For style, or the header
// repeated) it takes the last entry, the one the nearest proxy wrote;
// earlier entries are whatever the client sent. A header may carry a
// port, which is dropped, and an IPv4-mapped IPv6 address is its IPv4
// address, so one client has one form.
//
// With the header configured it is the only source: a request without it,
// or with a value that is no address, has the zero Addr (the hook routes
// give all such requests one bucket, the member routes no proof) rather
// than the peer's, which would be the proxy's and shared by every client.
func (s *Server) clientAddr(r *http.Request) netip.Addr {
	if h := s.cfg.ClientIPHeader; h != "" {
		v := r.Header.Values(h)
		if len(v) == 0 {
			return netip.Addr{}
		}
		last := v[len(v)-1]
		if i := strings.LastIndexByte(last, ','); i >= 0 {
			last = last[i+1:]
		}
		return parseAddr(strings.TrimSpace(last))
	}
	return parseAddr(r.RemoteAddr)
}

// parseAddr reads an address with or without a port; anything else is the
// zero Addr.
func parseAddr(v string) netip.Addr {
	if a, err := netip.ParseAddr(v); err == nil {
		return a.Unmap()
	}
	if ap, err := netip.ParseAddrPort(v); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// clientIP is clientAddr as the member routes' live-session proof compares
// it: "" when there is no address, which proves nothing.
func (s *Server) clientIP(r *http.Request) string {
	if a := s.clientAddr(r); a.IsValid() {
		return a.String()
	}
	return ""
}
