package services

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/claudemesh/meshbroker/protocol"
)

// URL watches (04 §3): a presence asks the broker to poll a URL and push
// `watch_triggered` to it when the watched value changes. A watch belongs
// to the presence that created it: it survives a reattach and a restart
// (realtime_persist.go), and dies at eviction.

// watch is one URL watch.
type watch struct {
	// Static after creation.
	id, meshID, presenceID, memberID string
	url                              string // as sent; echoed in acks and pushes
	mode, extract, notifyOn          string
	interval                         float64 // seconds, as acked
	every                            time.Duration
	headers                          map[string]string
	label                            *string
	createdAt                        time.Time
	seq                              uint64

	// Guarded by Realtime.mu.
	lastHash, lastValue string
	lastCheck           time.Time // zero until a check succeeded
	inFlight            bool      // a check is running; the next tick skips
	stopped             bool      // unwatched, evicted or closed: no more checks or pushes
	failing             bool      // the last check failed (its warning was logged)
	timer               *time.Timer
}

// stopLocked ends the watch's polling. Realtime.mu must be held.
func (w *watch) stopLocked() {
	w.stopped = true
	if w.timer != nil {
		w.timer.Stop()
	}
}

// WatchRequest is a decoded `watch` frame. Nil pointers are absent fields.
type WatchRequest struct {
	URL      string
	Mode     *string
	Extract  string
	Interval *float64 // seconds; nil when absent or not a number (→ 30)
	NotifyOn *string
	Headers  map[string]string
	Label    *string
}

// Watch creates a watch owned by c, starts its timer and its baseline
// check, and returns the ack. Errors: invalid_argument (URL, mode,
// headers), forbidden (an internal target, R2), limit_exceeded (caps).
func (r *Realtime) Watch(ctx context.Context, c *Conn, req WatchRequest) (protocol.WatchAck, error) {
	u, err := url.Parse(req.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Hostname() == "" {
		return protocol.WatchAck{}, newError(protocol.CodeInvalidArgument, "url must be an absolute http or https URL")
	}
	mode := "hash"
	if req.Mode != nil {
		mode = *req.Mode
	}
	if mode != "hash" && mode != "json" && mode != "status" {
		return protocol.WatchAck{}, newError(protocol.CodeInvalidArgument, "mode must be hash, json or status")
	}
	notifyOn := "change"
	if req.NotifyOn != nil {
		notifyOn = *req.NotifyOn
	}
	for k, v := range req.Headers {
		if !httpguts.ValidHeaderFieldName(k) || strings.ContainsAny(v, "\r\n\x00") {
			return protocol.WatchAck{}, newError(protocol.CodeInvalidArgument, "headers must map header names to single-line values")
		}
	}
	interval := watchDefaultInterval
	if req.Interval != nil {
		interval = *req.Interval
	}
	interval = min(max(interval, watchMinInterval), watchMaxInterval)
	if err := r.checkTarget(ctx, u.Hostname()); err != nil {
		return protocol.WatchAck{}, newError(protocol.CodeForbidden, "watch target refused: "+err.Error())
	}

	w := &watch{
		id: "w_" + protocol.NewUUID()[:8], meshID: c.MeshID, presenceID: c.PresenceID, memberID: c.MemberID,
		url: req.URL, mode: mode, extract: req.Extract, notifyOn: notifyOn, interval: interval,
		every: time.Duration(interval * float64(time.Second)), headers: req.Headers, label: req.Label, createdAt: r.now(),
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return protocol.WatchAck{}, newError(protocol.CodeInternal, "broker is shutting down")
	}
	inMesh, byMember := 0, 0
	for _, e := range r.watches {
		if e.meshID == c.MeshID {
			inMesh++
			if e.memberID == c.MemberID {
				byMember++
			}
		}
	}
	if byMember >= maxWatchesPerMember || inMesh >= maxWatchesPerMesh {
		r.mu.Unlock()
		return protocol.WatchAck{}, newError(protocol.CodeLimitExceeded,
			fmt.Sprintf("at most %d watches per member and %d per mesh", maxWatchesPerMember, maxWatchesPerMesh))
	}
	r.seq++
	w.seq = r.seq
	r.watches[w.id] = w
	r.markDirtyLocked(w.meshID)
	w.timer = time.AfterFunc(w.every, func() { r.fireWatch(w) })
	baseline := r.beginCheckLocked(w)
	r.mu.Unlock()
	if baseline {
		go r.runCheck(w)
	}
	r.log.Info("watch created", "watch_id", w.id, "presence_id", c.PresenceID, "mesh", c.MeshID, "host", u.Host, "mode", mode, "interval_s", interval)
	return protocol.WatchAck{Type: "watch_ack", WatchID: w.id, URL: w.url, Mode: mode, Interval: interval}, nil
}

// Unwatch deletes a watch of the caller's member (R2: sibling sessions of
// the owner may, nobody else). The ack names the deleted watch, or carries
// empty url and mode when there was none the caller may delete.
func (r *Realtime) Unwatch(c *Conn, id string) protocol.WatchAck {
	ack := protocol.WatchAck{Type: "watch_ack", WatchID: id}
	r.mu.Lock()
	w := r.watches[id]
	if w != nil && w.meshID == c.MeshID && w.memberID == c.MemberID {
		w.stopLocked()
		delete(r.watches, id)
		r.markDirtyLocked(w.meshID)
		ack.URL, ack.Mode = w.url, w.mode
	}
	r.mu.Unlock()
	if ack.Mode != "" {
		r.log.Info("watch removed", "watch_id", id, "presence_id", c.PresenceID)
	}
	return ack
}

// WatchList returns the caller presence's watches in creation order.
func (r *Realtime) WatchList(c *Conn) []protocol.WatchInfo {
	r.mu.Lock()
	var mine []*watch
	for _, w := range r.watches {
		if w.presenceID == c.PresenceID {
			mine = append(mine, w)
		}
	}
	out := make([]protocol.WatchInfo, 0, len(mine))
	slices.SortFunc(mine, func(a, b *watch) int { return cmp.Compare(a.seq, b.seq) })
	for _, w := range mine {
		info := protocol.WatchInfo{
			ID: w.id, URL: w.url, Mode: w.mode, Label: w.label, Interval: w.interval,
			LastHash: w.lastHash, LastValue: w.lastValue, CreatedAt: protocol.ISO(w.createdAt),
		}
		if !w.lastCheck.IsZero() {
			info.LastCheck = protocol.ISO(w.lastCheck)
		}
		out = append(out, info)
	}
	r.mu.Unlock()
	return out
}

// dropWatchesLocked deletes every watch owned by c (eviction, 04 §2 step 5).
func (r *Realtime) dropWatchesLocked(c *Conn) int {
	n := 0
	for id, w := range r.watches {
		if w.presenceID == c.PresenceID {
			w.stopLocked()
			delete(r.watches, id)
			n++
		}
	}
	return n
}

// fireWatch is the watch's timer: re-arm, then start a check unless one is
// still in flight (a slow target never piles checks up).
func (r *Realtime) fireWatch(w *watch) {
	r.mu.Lock()
	if w.stopped || r.closed {
		r.mu.Unlock()
		return
	}
	w.timer.Reset(w.every)
	start := r.beginCheckLocked(w)
	r.mu.Unlock()
	if start {
		go r.runCheck(w)
	}
}

// beginCheckLocked claims the next check of w; the caller then runs
// runCheck, which releases it. Realtime.mu must be held.
func (r *Realtime) beginCheckLocked(w *watch) bool {
	if w.stopped || w.inFlight || r.closed {
		return false
	}
	w.inFlight = true
	r.wg.Add(1)
	return true
}

// runCheck is one check (04 §3.2): fetch, compare, maybe notify the owner.
// A failed fetch changes nothing.
func (r *Realtime) runCheck(w *watch) {
	defer r.wg.Done()
	value, err := r.fetchWatch(r.ctx, w)
	now := r.now()

	r.mu.Lock()
	w.inFlight = false
	if w.stopped {
		r.mu.Unlock()
		return
	}
	if err != nil {
		first := !w.failing
		w.failing = true
		r.mu.Unlock()
		// Warn once per failing streak; repeats are Debug, so a dead target
		// polled every 5 s does not flood the log.
		level := r.log.Debug
		if first {
			level = r.log.Warn
		}
		level("watch check failed", "watch_id", w.id, "mesh", w.meshID, "err", err)
		return
	}
	w.failing = false
	w.lastCheck = now
	old := w.lastValue
	notify := old != "" && watchNotifies(w.notifyOn, old, value)
	if value != old {
		r.markDirtyLocked(w.meshID) // the baseline a restored watch compares with
	}
	w.lastHash, w.lastValue = value, value
	r.mu.Unlock()

	if !notify {
		return
	}
	f := r.systemPush(w.meshID, "watch_triggered", "now", protocol.WatchTriggered{
		WatchID: w.id, URL: w.url, Label: w.label, Mode: w.mode, OldValue: old, NewValue: value,
	})
	delivered := r.sendTo(w.presenceID, f)
	r.log.Info("watch triggered", "watch_id", w.id, "mesh", w.meshID, "delivered", delivered)
}

// watchNotifies applies notify_on to a change from old to cur. Unknown
// triggers (the CLI's "changed", "always") never fire, as in the reference.
func watchNotifies(notifyOn, old, cur string) bool {
	switch {
	case notifyOn == "change":
		return cur != old
	case strings.HasPrefix(notifyOn, "match:"):
		target := notifyOn[len("match:"):]
		return cur == target && old != target
	case strings.HasPrefix(notifyOn, "not_match:"):
		target := notifyOn[len("not_match:"):]
		return cur != target && old == target
	}
	return false
}

var errBodyTooLarge = fmt.Errorf("body larger than %d bytes", watchMaxBody)

// fetchWatch GETs the URL and returns the watched value.
func (r *Realtime) fetchWatch(ctx context.Context, w *watch) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, watchFetchTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.url, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("User-Agent", "meshbroker-watch")
	for k, v := range w.headers {
		req.Header.Set(k, v)
	}
	resp, err := r.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if w.mode == "status" {
		return strconv.Itoa(resp.StatusCode), nil
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, watchMaxBody+1))
	if err != nil {
		return "", fmt.Errorf("read body: %w", err)
	}
	if len(body) > watchMaxBody {
		return "", errBodyTooLarge
	}
	return watchValue(w.mode, w.extract, body), nil
}

// watchValue is the value a body yields: an extracted JSON value as text
// in json mode with an extract path, else the first 16 hex digits of the
// body's SHA-256.
func watchValue(mode, extract string, body []byte) string {
	if mode == "json" && extract != "" {
		var doc any
		if err := json.Unmarshal(body, &doc); err != nil {
			s := []rune(strings.ToValidUTF8(string(body), "\uFFFD"))
			return string(s[:min(len(s), 200)])
		}
		return jsString(extractPath(doc, extract))
	}
	sum := sha256.Sum256(body)
	return hex.EncodeToString(sum[:8])
}

// extractPath walks a dot path: a leading "$" and one "." after it are
// dropped, the rest split on "." and followed key by key; array elements
// are addressed by decimal index. A missing step yields nil.
func extractPath(doc any, extract string) any {
	path := extract
	if strings.HasPrefix(path, "$") {
		path = strings.TrimPrefix(path[1:], ".")
	}
	v := doc
	for _, key := range strings.Split(path, ".") {
		switch x := v.(type) {
		case map[string]any:
			v = x[key]
		case []any:
			i, err := strconv.Atoi(key)
			if err != nil || i < 0 || i >= len(x) || strconv.Itoa(i) != key {
				return nil
			}
			v = x[i]
		default:
			return nil
		}
	}
	return v
}

// jsString is JavaScript's String(v ?? "null") for a decoded JSON value.
func jsString(v any) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case string:
		return x
	case bool:
		return strconv.FormatBool(x)
	case float64:
		return protocol.FormatJSNumber(x)
	case []any:
		parts := make([]string, len(x))
		for i, e := range x {
			if e != nil {
				parts[i] = jsString(e)
			}
		}
		return strings.Join(parts, ",")
	default:
		return "[object Object]"
	}
}
