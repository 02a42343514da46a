package client

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Reconnection (Options.Reconnect). The Client's run goroutine, having
// seen its socket end, calls redial; nothing else dials, so there is never
// more than one socket or one redial per Client. Requests that were
// waiting have already failed with ErrConnectionLost (dropped), writes in
// between return ErrNotConnected, and Events keeps its buffered frames.
//
// Each attempt sends a fresh, fully signed hello of the same identity (the
// same session key for a session client, the same sessionId either way)
// plus the resumeToken of the latest hello_ack. The broker then gives back
// the same lease: by the token, or by the key and sessionId of a lease in
// its grace period (01 §6.1), or, for a session key it still thinks is
// online, by takeover (H6). Peers see neither peer_left nor peer_joined,
// and DMs queued meanwhile are pushed right after hello_ack. A loss longer
// than the broker's lease (LEASE_TTL_MS, 90 s by default) gives a new
// presence instead; OnReconnect's ack.PresenceID tells which happened. The
// token is only ever replayed with the identity whose hello earned it, so
// it stays valid whether the broker binds it to the session key or the
// member key. A token refused along with its hello is dropped, and the
// next attempt is a plain signed hello, which the broker judges on its own.

// redial waits out the backoff and reconnects, until it succeeds, the
// broker refuses for good, MaxAttempts runs out or the Client is closed.
func (c *Client) redial() (*conn, handshakeResult, error) {
	pol := *c.Opts.Reconnect
	lo, hi := pol.bounds()
	step := lo
	useToken := true
	for failures := 0; ; {
		wait := time.NewTimer(jitter(step))
		select {
		case <-c.ctx.Done():
			wait.Stop()
			return nil, handshakeResult{}, ErrClosed
		case <-wait.C:
		}
		var token string
		if useToken {
			c.mu.Lock()
			token = c.lastAck.ResumeToken
			c.mu.Unlock()
			if token == "" {
				token = c.Opts.ResumeToken
			}
		}
		cn, res, err := c.dialHello(c.ctx, token)
		if err == nil {
			c.mu.Lock()
			c.lastAck, c.lastAckRaw = res.ack, res.raw
			c.mu.Unlock()
			c.cur.Store(cn)
			if c.ctx.Err() != nil { // Close or Kill ran meanwhile and may have missed cn
				c.cur.CompareAndSwap(cn, nil)
				_ = cn.ws.Close()
				return nil, res, ErrClosed
			}
			if pol.OnReconnect != nil {
				pol.OnReconnect(res.ack)
			}
			return cn, res, nil
		}
		if c.ctx.Err() != nil {
			return nil, res, ErrClosed
		}
		var he *HandshakeError
		if errors.As(err, &he) && !he.retryable() {
			if token == "" {
				return nil, res, fmt.Errorf("reconnect: %w", err)
			}
			// A token whose lease vanished under it is refused ("resume
			// rejected: lease expired"); a full hello without it decides.
			useToken = false
		}
		failures++
		if pol.MaxAttempts > 0 && failures >= pol.MaxAttempts {
			return nil, res, fmt.Errorf("reconnect: giving up after %d attempts: %w", failures, err)
		}
		step = min(2*step, hi)
	}
}

// jitter picks a delay in [d/2, d].
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}
