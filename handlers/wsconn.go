package handlers

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/labstack/echo/v4"

	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// wsConn is one WebSocket. gorilla allows one concurrent reader and one
// concurrent writer: serve's loop is the only reader, and at most one writer
// goroutine runs at a time; anyone may call Offer, Close and Terminate.
//
// Concurrency: serve runs on a goroutine of its own (the HTTP handler has
// returned). It reads frames and hands each to a short-lived goroutine that
// it waits for, so the long-lived reader's stack stays small; reader-owned
// fields are touched only by the two in turn. The writer runs on demand:
// Offer, a due ping or the close starts it, and it exits once nothing is
// left to write, so an idle socket holds one goroutine (the reader) and two
// stopped-or-waiting timers, not a second parked stack. Successive writer
// goroutines hand over under qmu, which orders the writer-owned fields
// between them. Pipelined sends are completed, in order, by one completer
// goroutine started at the socket's first send. A panic in any of these
// ends the socket (or the one send), never the broker.
//
// Policy for a second socket of one session: the presence service decides
// (reattach, takeover or dedup); this type only carries frames.
type wsConn struct {
	// Static after construction.
	srv        *Server
	ws         *websocket.Conn
	closing    chan struct{} // closed once, by shutdown()
	writerDone chan struct{} // closed when the last writer has exited for good
	clientIP   string        // the client's address, for the member routes' live-session proof

	// Written once before closing is closed, read by the writer after.
	closeOnce  sync.Once
	closeFrame protocol.Close
	abrupt     bool // Terminate: drop the TCP connection, no close frame
	// writeFailed: the close began because a write to the peer failed, most
	// often because the peer had already closed. The broker did not choose
	// to end the session, so a close frame the peer sent first still counts
	// as the peer's (a one-shot CLI command sends a request and closes at
	// once; the reply's write fails before the reader sees the close).
	writeFailed bool

	// deadlineMu orders read-deadline renewals (reader) against the close
	// grace (writer): once graced is set no renewal may push the deadline
	// out again, or a peer that keeps sending (even bare pongs) would hold
	// a closed socket open.
	deadlineMu sync.Mutex
	graced     bool

	// Reader-owned: set by readFrames when the client ended the socket
	// itself with a normal close (clientClosedNormally), read by serve
	// after the reader returned.
	closedByClient bool

	authed    atomic.Bool                   // set by the reader after a successful hello; read by the hello timer
	ident     atomic.Pointer[services.Conn] // the presence, for log lines; set with authed
	confirmed atomic.Uint64                 // highest write sequence a pong has confirmed; set by the reader
	pongs     chan struct{}                 // (cap 1) the reader signals every pong here, for confirmWritten

	// Shutdown stops the reader's dispatching (stopReading): once draining
	// is set, frames read are dropped (client_ack excepted), and dispatchMu,
	// held by the reader around each dispatch, lets stopReading wait for the
	// frame in hand.
	draining   atomic.Bool
	dispatchMu sync.Mutex

	// Owned by the reader: serve's loop and the frame goroutine it waits for.
	lastPongReport time.Time // when a pong was last reported to the presence
	presence       *services.Conn
	completions    chan completion // pipelined sends, to completeSends; made at the first send, closed by serve
	completerDone  chan struct{}   // closed when completeSends has finished
	sendsPending   sync.WaitGroup  // pipelined sends not yet acked; Add by the reader, Done by completeSends
	peerClose      int             // close code the peer sent, 0 if none

	// The outbound queue grows on demand up to cfg.OutboxFrames, so an idle
	// socket holds no buffer. qmu guards it and the writer's run state.
	qmu          sync.Mutex
	queue        []protocol.Frame
	writing      bool // a writer goroutine is running
	writerExited bool // the socket is done writing; no writer starts again
	pingDue      bool // a ping should be written
	confirmArmed bool // confirmTimer is running
	pingTimer    *time.Timer
	confirmTimer *time.Timer

	// Owned by the running writer (read by Unsent once writing has ended).
	writeSeq uint64 // frames written so far
	spare    []protocol.Frame

	// wmu guards written: the writer appends, the reader's pong handler
	// takes what a pong confirmed. confirmMu (taken first) spans taking
	// and handing the confirmed ids to messaging, so settled never sees a
	// push gone from written whose delivered mark is not queued yet.
	confirmMu sync.Mutex
	wmu       sync.Mutex
	written   []writtenPush // queue pushes written but not yet confirmed by a pong
}

// writtenPush is a queue push the writer handed to the socket. It counts as
// received once a pong answers a ping written after it: the peer read the
// stream past it.
type writtenPush struct {
	seq uint64
	id  string
}

// Offer queues a frame for the writer without blocking. A full queue means
// a slow consumer: the socket is closed with the retry code and the caller
// falls back to the durable queue (the next socket's drain).
func (w *wsConn) Offer(f protocol.Frame) bool {
	select {
	case <-w.closing:
		return false
	default:
	}
	w.qmu.Lock()
	if w.writerExited {
		// The writer is gone for good (a write failed just now): a frame
		// queued now would be in no one's hands, not even Unsent's, which
		// may already have run.
		w.qmu.Unlock()
		return false
	}
	n := len(w.queue)
	if n >= w.srv.cfg.OutboxFrames {
		w.qmu.Unlock()
		w.srv.svc.Metrics.SlowConsumers.Inc()
		w.logAt(slog.LevelWarn, "slow consumer", "queued", n)
		w.Close(protocol.CloseSlowConsumer)
		return false
	}
	w.queue = append(w.queue, f)
	start := w.startWriterLocked()
	w.qmu.Unlock()
	if start {
		go w.writeRun()
	}
	return true
}

// startWriterLocked reports whether the caller must start a writer: none is
// running and the socket may still write. qmu must be held.
func (w *wsConn) startWriterLocked() bool {
	if w.writing || w.writerExited {
		return false
	}
	w.writing = true
	return true
}

// kickWriter makes sure a writer will look at the socket's state.
func (w *wsConn) kickWriter() {
	w.qmu.Lock()
	start := w.startWriterLocked()
	w.qmu.Unlock()
	if start {
		go w.writeRun()
	}
}

// requestPing asks the writer for a ping: the heartbeat's, or the one that
// confirms written pushes.
func (w *wsConn) requestPing(confirm bool) {
	w.qmu.Lock()
	if confirm {
		w.confirmArmed = false
	}
	w.pingDue = true
	start := w.startWriterLocked()
	w.qmu.Unlock()
	if start {
		go w.writeRun()
	}
}

// requeue puts frames the writer could not write back at the head of the
// queue, so Unsent still sees them.
func (w *wsConn) requeue(frames []protocol.Frame) {
	if len(frames) == 0 {
		return
	}
	w.qmu.Lock()
	w.queue = append(append([]protocol.Frame(nil), frames...), w.queue...)
	w.qmu.Unlock()
}

// takeQueued hands the writer everything queued, giving it spare (emptied)
// to reuse, so a busy socket does not allocate per batch.
func (w *wsConn) takeQueued(spare []protocol.Frame) []protocol.Frame {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	return w.takeQueuedLocked(spare)
}

func (w *wsConn) takeQueuedLocked(spare []protocol.Frame) []protocol.Frame {
	batch := w.queue
	if len(batch) == 0 {
		return spare[:0]
	}
	clear(spare)
	w.queue = spare[:0]
	if cap(spare) > 256 {
		w.queue = nil // let a burst's large buffer go once the burst is over
	}
	return batch
}

// Close sends c after the frames already offered, then ends the socket.
func (w *wsConn) Close(c protocol.Close) { w.shutdown(c, false, false) }

// Terminate ends the socket without a close frame; the peer sees 1006.
func (w *wsConn) Terminate() {
	w.shutdown(protocol.Close{}, true, false)
	_ = w.ws.NetConn().Close() // unblocks both loops at once
}

// writeFailure ends the socket after a failed write, as Terminate does, but
// records that the broker did not choose to (see writeFailed).
func (w *wsConn) writeFailure() {
	w.shutdown(protocol.Close{}, true, true)
	_ = w.ws.NetConn().Close()
}

// takeConfirmed removes and returns the written pushes a pong up to write
// sequence upTo has confirmed.
func (w *wsConn) takeConfirmed(upTo uint64) []string {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	i := 0
	for i < len(w.written) && w.written[i].seq <= upTo {
		i++
	}
	if i == 0 {
		return nil
	}
	ids := make([]string, i)
	for j := range i {
		ids[j] = w.written[j].id
	}
	w.written = append(w.written[:0], w.written[i:]...)
	if len(w.written) == 0 && cap(w.written) > 256 {
		w.written = nil // let a burst's buffer go
	}
	return ids
}

// unconfirmed counts written pushes no pong has confirmed yet.
func (w *wsConn) unconfirmed() int {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	return len(w.written)
}

// Unsent returns the messageIds of the queue pushes this socket cannot vouch
// for: written but never confirmed by a pong, or never written at all.
// Called once the writer has exited.
func (w *wsConn) Unsent() []string {
	w.takeConfirmed(w.confirmed.Load()) // settled by the pong handler already
	w.wmu.Lock()
	ids := make([]string, 0, len(w.written))
	for _, p := range w.written {
		ids = append(ids, p.id)
	}
	w.wmu.Unlock()
	for _, f := range w.takeQueued(nil) {
		if id, ok := pushMessageID(f); ok {
			ids = append(ids, id)
		}
	}
	return ids
}

// pushMessageID reads the messageId of a queue push frame, which the
// protocol package encodes with type first and messageId second; system
// pushes (subtype second) are not queue rows.
func pushMessageID(f protocol.Frame) (string, bool) {
	const prefix = `{"type":"push","messageId":"`
	if !bytes.HasPrefix(f, []byte(prefix)) {
		return "", false
	}
	rest := f[len(prefix):]
	end := bytes.IndexByte(rest, '"')
	if end < 0 {
		return "", false
	}
	return string(rest[:end]), true
}

func (w *wsConn) shutdown(c protocol.Close, abrupt, writeFailed bool) {
	w.closeOnce.Do(func() {
		w.closeFrame, w.abrupt, w.writeFailed = c, abrupt, writeFailed
		close(w.closing)
		w.kickWriter()
	})
}

// writeRun writes what is queued and any due ping, until nothing is left;
// on close it flushes what was offered before it, writes the close frame and
// gives the peer WriteWait to answer before the reader's deadline ends the
// connection. A write error ends the socket.
func (w *wsConn) writeRun() {
	defer func() {
		if r := recover(); r != nil {
			w.logAt(slog.LevelError, "socket writer panic", "panic", r)
			w.Terminate()
			w.exitWriter()
		}
	}()
	bc, _ := w.ws.NetConn().(*batchConn)
	for {
		w.qmu.Lock()
		var closing bool
		select {
		case <-w.closing:
			closing = true
		default:
		}
		batch := w.takeQueuedLocked(w.spare)
		ping := w.pingDue
		w.pingDue = false
		if !closing && len(batch) == 0 && !ping {
			w.spare = nil // an idle socket keeps no batch buffer
			w.writing = false
			w.qmu.Unlock()
			return
		}
		w.qmu.Unlock()

		if closing {
			if !w.abrupt && w.writeBatch(batch, nil) {
				msg := websocket.FormatCloseMessage(w.closeFrame.Code, w.closeFrame.Reason)
				_ = w.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(w.srv.cfg.WriteWait))
				// The reader returns when the peer answers the close, or at
				// this deadline: a peer that never answers does not hold
				// shutdown up.
				w.deadlineMu.Lock()
				w.graced = true
				_ = w.ws.NetConn().SetReadDeadline(time.Now().Add(min(w.srv.cfg.WriteWait, closeGrace)))
				w.deadlineMu.Unlock()
			} else if w.abrupt {
				w.requeue(batch)
			}
			w.exitWriter()
			return
		}
		if !w.writeBatch(batch, bc) || ping && !w.sendPing() {
			w.exitWriter()
			return
		}
		w.spare = batch
	}
}

// exitWriter ends writing for good; a second call does nothing.
func (w *wsConn) exitWriter() {
	w.qmu.Lock()
	already := w.writerExited
	w.writing, w.writerExited = false, true
	w.qmu.Unlock()
	if !already {
		close(w.writerDone)
	}
}

// writeBatch writes frames, coalesced into few syscalls through bc when
// there is more than one. On a write error it terminates the socket, puts
// the unwritten frames back for Unsent and reports false.
func (w *wsConn) writeBatch(batch []protocol.Frame, bc *batchConn) bool {
	held := bc != nil && len(batch) > 1
	if held {
		bc.Hold()
	}
	for i, f := range batch {
		if !w.writeFrame(f) {
			w.requeue(batch[i+1:])
			if held {
				_ = bc.Release()
			}
			return false
		}
	}
	if held {
		if err := bc.Release(); err != nil {
			w.writeFailure()
			return false
		}
	}
	return true
}

// writeFrame writes one frame and records a queue push for confirmation.
func (w *wsConn) writeFrame(f protocol.Frame) bool {
	_ = w.ws.SetWriteDeadline(time.Now().Add(w.srv.cfg.WriteWait))
	if err := w.ws.WriteMessage(websocket.TextMessage, f); err != nil {
		if id, ok := pushMessageID(f); ok {
			w.wmu.Lock()
			w.written = append(w.written, writtenPush{seq: math.MaxUint64, id: id}) // never confirmed
			w.wmu.Unlock()
		}
		w.writeFailure()
		return false
	}
	w.writeSeq++
	w.srv.svc.Metrics.FramesOut.Inc()
	w.srv.svc.Metrics.BytesOut.Add(float64(len(f)))
	if id, ok := pushMessageID(f); ok {
		w.wmu.Lock()
		w.written = append(w.written, writtenPush{seq: w.writeSeq, id: id})
		w.wmu.Unlock()
		w.armConfirm()
	}
	return true
}

// armConfirm schedules the ping that confirms written pushes
// (PushConfirmDelay after the first unconfirmed one, so a busy socket pays
// one ping per interval, not one per push), unless one is already due.
func (w *wsConn) armConfirm() {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	if w.confirmArmed || w.writerExited {
		return
	}
	w.confirmArmed = true
	if w.confirmTimer == nil {
		w.confirmTimer = time.AfterFunc(w.srv.cfg.PushConfirmDelay, func() { w.requestPing(true) })
		return
	}
	w.confirmTimer.Reset(w.srv.cfg.PushConfirmDelay)
}

// sendPing writes a ping whose payload is the write sequence; the pong
// echoes it back.
func (w *wsConn) sendPing() bool {
	payload := strconv.AppendUint(nil, w.writeSeq, 10)
	if err := w.ws.WriteControl(websocket.PingMessage, payload, time.Now().Add(w.srv.cfg.WriteWait)); err != nil {
		w.writeFailure()
		return false
	}
	return true
}

// closeGrace is how long a closed socket waits for the peer's close reply.
const closeGrace = time.Second

// handleWS upgrades exactly `/ws` and serves the socket until it closes.
func (s *Server) handleWS(c echo.Context) error {
	if c.Request().RequestURI != "/ws" || !websocket.IsWebSocketUpgrade(c.Request()) {
		if websocket.IsWebSocketUpgrade(c.Request()) {
			dropConnection(c)
			return nil
		}
		if c.Request().RequestURI == "/ws" {
			// A browser or curl on the WebSocket URL: say what it takes
			// rather than a bare 404 (RFC 9110 §15.5.22).
			c.Response().Header().Set("Upgrade", "websocket")
			c.Response().Header().Set("Connection", "Upgrade")
			return c.JSON(http.StatusUpgradeRequired, errorBody{Error: "upgrade required: /ws is a WebSocket endpoint; connect with a WebSocket client (Connection: Upgrade, Upgrade: websocket) and send hello first"})
		}
		return echo.ErrNotFound
	}
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		dropConnection(c)
		return nil
	}
	s.wg.Add(1)
	s.mu.Unlock()

	ws, err := s.upgrader.Upgrade(c.Response(), c.Request(), nil)
	if err != nil {
		s.wg.Done()
		return nil // the upgrader already answered with an HTTP error
	}
	s.svc.Metrics.ConnectionsTotal.Inc()
	w := &wsConn{
		srv: s, ws: ws, closing: make(chan struct{}), writerDone: make(chan struct{}), pongs: make(chan struct{}, 1),
		clientIP: s.clientIP(c.Request()),
	}
	s.mu.Lock()
	s.socks[w] = struct{}{}
	s.mu.Unlock()
	// The socket gets a goroutine of its own and the HTTP handler returns:
	// net/http then lets go of what it keeps per connection (its 4 KB read
	// and write buffers, the request and its headers, echo's context), which
	// a handler blocked in the read loop would pin for the socket's life.
	go func() {
		defer s.wg.Done()
		defer func() {
			s.mu.Lock()
			delete(s.socks, w)
			s.mu.Unlock()
		}()
		// Not under net/http's or echo's recovery any more: a panic in the
		// teardown (the reader has its own) must not take the broker down.
		defer func() {
			if r := recover(); r != nil {
				w.logAt(slog.LevelError, "socket teardown panic", "panic", r)
			}
		}()
		w.serve()
	}()
	return nil
}

// logAt logs a line about this socket. The socket's attributes are added
// per line rather than kept in a derived logger: a logger per socket costs
// about a kilobyte that an idle socket would hold for nothing.
func (w *wsConn) logAt(level slog.Level, msg string, args ...any) {
	ctx := context.Background()
	if !w.srv.log.Enabled(ctx, level) {
		return
	}
	l := w.srv.log.With("remote", remoteShort(w.ws.RemoteAddr()))
	if c := w.ident.Load(); c != nil {
		l = l.With("presence_id", c.PresenceID, "mesh", c.MeshID, "peer", protocol.Short(c.RoutingPubkey()))
	}
	l.Log(ctx, level, msg, args...)
}

// RemoteAddr is the peer's address, for the presence service's log lines.
func (w *wsConn) RemoteAddr() string { return remoteShort(w.ws.RemoteAddr()) }

func remoteShort(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// serve runs the reader in this goroutine, with writers coming and going
// beside it; all have stopped when it returns, and the presence (if any)
// has been told.
func (w *wsConn) serve() {
	cfg := w.srv.cfg
	opened := time.Now()
	w.qmu.Lock()
	w.pingTimer = time.AfterFunc(cfg.PingInterval, w.heartbeat)
	w.qmu.Unlock()

	helloTimer := time.AfterFunc(cfg.HelloTimeout, func() {
		if !w.authed.Load() {
			w.Offer(protocol.MustEncode(protocol.ErrorFrame{Type: "error", Code: protocol.CodeHelloTimeout, Message: "no hello within " + cfg.HelloTimeout.String()}))
			w.Close(protocol.HandshakeClose(protocol.CodeHelloTimeout))
		}
	})
	w.ws.SetReadLimit(int64(cfg.MaxMessageBytes))
	w.renewReadDeadline(time.Now())
	w.ws.SetPongHandler(func(payload string) error {
		w.renewReadDeadline(time.Now())
		if seq, err := strconv.ParseUint(payload, 10, 64); err == nil && seq > w.confirmed.Load() {
			w.confirmed.Store(seq) // only this goroutine stores
			// The peer read the stream up to seq: the pushes before it are
			// proven delivered (M3).
			w.confirmMu.Lock()
			if ids := w.takeConfirmed(seq); len(ids) > 0 {
				w.srv.svc.Messaging.Confirmed(w.presence, w, ids)
			}
			w.confirmMu.Unlock()
		}
		// Confirmation pings make pongs frequent on a busy socket; the
		// presence needs to hear of liveness about once per heartbeat (and
		// at most once a second), not of each.
		if now := time.Now(); w.presence != nil && now.Sub(w.lastPongReport) >= min(time.Second, w.srv.cfg.PingInterval/2) {
			w.lastPongReport = now
			w.srv.svc.Presence.Pong(w.presence)
		}
		select {
		case w.pongs <- struct{}{}:
		default:
		}
		return nil
	})
	w.readFrames()
	helloTimer.Stop()
	// Who ended the socket, read before serve's own teardown below closes
	// it too: closeFrame and abrupt are written before closing is closed.
	code, by := 1006, "network"
	select {
	case <-w.closing:
		switch {
		case w.writeFailed && w.peerClose != 0:
			code, by = w.peerClose, "peer"
		case w.writeFailed:
		default:
			by = "broker"
			if !w.abrupt && w.closeFrame.Code != 0 {
				code = w.closeFrame.Code
			}
		}
	default:
		if w.peerClose != 0 {
			code, by = w.peerClose, "peer"
		}
	}
	w.srv.svc.Metrics.Closes.WithLabelValues(strconv.Itoa(code), by).Inc()
	level := slog.LevelDebug // a probe or a rejected hello: already logged, or not a session
	if w.presence != nil {
		level = slog.LevelInfo
	}
	w.logAt(level, "ws session end", "code", code, "by", by, "duration_ms", time.Since(opened).Milliseconds())
	// Sends already accepted still get their commit, ack and pushes (the
	// ack may no longer reach this socket; the row is stored either way).
	if w.completions != nil {
		close(w.completions)
		<-w.completerDone
	}
	// Tear the socket down before the presence cleanup, so a reconnecting
	// client never finds this socket still registered as live.
	w.shutdown(protocol.Close{}, true, false)
	_ = w.ws.NetConn().Close()
	<-w.writerDone
	w.qmu.Lock()
	w.pingTimer.Stop()
	if w.confirmTimer != nil {
		w.confirmTimer.Stop()
	}
	w.qmu.Unlock()
	if w.presence != nil {
		if w.closedByClient {
			w.srv.svc.Presence.ClosedByClient(w.presence, w)
		} else {
			w.srv.svc.Presence.Closed(w.presence, w)
		}
	}
}

// readFrames reads and dispatches frames until the socket ends. A panic
// anywhere on the way (dispatch recovers its handlers' own) ends this
// socket only: it is logged, and serve tears the socket down as after any
// read error.
func (w *wsConn) readFrames() {
	defer func() {
		if r := recover(); r != nil {
			w.logAt(slog.LevelError, "socket reader panic", "panic", r)
		}
	}()
	// Any inbound frame proves the peer alive too: a client busy sending has
	// its pong queued behind its own frames, and must not be cut off as
	// stale while the broker works through them. Renewed at most once a
	// second, so a flood of frames costs no extra work.
	lastAlive := time.Now()
	for {
		_, data, err := w.ws.ReadMessage()
		if err != nil {
			w.closedByClient = w.clientClosedNormally(err)
			w.logReadEnd(err)
			return
		}
		w.srv.svc.Metrics.FramesIn.Inc()
		w.srv.svc.Metrics.BytesIn.Add(float64(len(data)))
		if now := time.Now(); now.Sub(lastAlive) >= time.Second {
			lastAlive = now
			w.renewReadDeadline(now)
			if w.presence != nil {
				w.srv.svc.Presence.Pong(w.presence)
			}
		}
		w.dispatchMu.Lock()
		if !w.draining.Load() || isClientAck(data) {
			onFreshStack(func() { w.dispatch(data) })
		}
		w.dispatchMu.Unlock()
	}
}

// isClientAck reports whether a frame is a client_ack, the one frame a
// socket still handles while the broker shuts down: it settles a push
// instead of starting new work.
func isClientAck(data []byte) bool {
	h, _, err := protocol.DecodeHeadSend(data)
	return err == nil && h.Type == "client_ack"
}

// stopReading is shutdown's first step on this socket: frames read from
// now on are dropped (a send among them was never acked, so its client
// sends it again to the next broker), the frame being handled finishes,
// and so do the sends already accepted, whose acks are then queued. It
// returns early when ctx ends.
func (w *wsConn) stopReading(ctx context.Context) {
	w.draining.Store(true)
	w.dispatchMu.Lock()
	//lint:ignore SA2001 the empty critical section is the point: it waits for the frame in hand
	w.dispatchMu.Unlock()
	done := make(chan struct{})
	go func() { w.sendsPending.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// settled reports that nothing offered to this socket waits for writing or
// for a pong's confirmation.
func (w *wsConn) settled() bool {
	w.qmu.Lock()
	idle := len(w.queue) == 0 && !w.writing
	w.qmu.Unlock()
	if !idle {
		return false
	}
	w.confirmMu.Lock()
	defer w.confirmMu.Unlock()
	return w.unconfirmed() == 0
}

// confirmWritten is shutdown's wait for proof of delivery on this socket:
// it pings after everything queued and returns once a pong has confirmed
// every push written, the socket has stopped writing, or ctx ends (a peer
// that does not answer pings costs the whole wait, shared by all sockets).
func (w *wsConn) confirmWritten(ctx context.Context) {
	for !w.settled() {
		w.requestPing(false)
		select {
		case <-w.pongs:
		case <-w.writerDone:
			return
		case <-ctx.Done():
			return
		}
	}
}

// renewReadDeadline gives the peer PongTimeout from now to be heard from
// again, unless the socket is closing and the writer has set its grace.
func (w *wsConn) renewReadDeadline(now time.Time) {
	w.deadlineMu.Lock()
	if !w.graced {
		_ = w.ws.SetReadDeadline(now.Add(w.srv.cfg.PongTimeout))
	}
	w.deadlineMu.Unlock()
}

// heartbeat asks for the periodic ping and schedules the next one.
func (w *wsConn) heartbeat() {
	w.requestPing(false)
	w.qmu.Lock()
	if !w.writerExited {
		w.pingTimer.Reset(w.srv.cfg.PingInterval)
	}
	w.qmu.Unlock()
}

// clientClosedNormally reports whether the read ended because the client
// sent a normal close (1000, 1001, or a close frame with no code, which is
// what the `ws` package's close() sends) before the broker began closing
// this socket. A close frame answering the broker's own (shutdown, kick,
// session_replaced, a protocol error) echoes the broker's code and does not
// count; a drop (no close frame) arrives as 1006 or a read error. A close
// that began with a failed write (writeFailed) is not the broker's own: the
// peer's close frame read after it still counts.
func (w *wsConn) clientClosedNormally(err error) bool {
	var ce *websocket.CloseError
	if !errors.As(err, &ce) {
		return false
	}
	switch ce.Code {
	case websocket.CloseNormalClosure, websocket.CloseGoingAway, websocket.CloseNoStatusReceived:
	default:
		return false
	}
	select {
	case <-w.closing:
		return w.writeFailed // the broker's own close does not count; a failed write is not one
	default:
		return true
	}
}

func (w *wsConn) logReadEnd(err error) {
	var ce *websocket.CloseError
	switch {
	case errors.As(err, &ce):
		w.peerClose = ce.Code
		w.logAt(slog.LevelDebug, "ws closed by peer", "code", ce.Code, "reason", ce.Text)
	case errors.Is(err, websocket.ErrReadLimit):
		w.logAt(slog.LevelWarn, "ws frame too large", "limit", w.srv.cfg.MaxMessageBytes)
	default:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			if w.presence != nil {
				// logAt adds presence_id, mesh and peer already.
				w.logAt(slog.LevelWarn, "ws stale terminate", "code", 1006, "idle_ms", w.srv.cfg.PongTimeout.Milliseconds())
			}
			return
		}
		w.logAt(slog.LevelDebug, "ws read ended", "err", err)
	}
}
