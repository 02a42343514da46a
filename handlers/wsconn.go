package handlers

import (
	"bytes"
	"errors"
	"log/slog"
	"math"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/labstack/echo/v4"

	"meshbroker/protocol"
	"meshbroker/services"
)

// wsConn is one WebSocket. gorilla allows one concurrent reader and one
// concurrent writer: readLoop (in the handler goroutine) is the only reader
// and writeLoop the only writer; anyone may call Offer, Close and Terminate.
//
// Policy for a second socket of one session: the presence service decides
// (reattach, takeover or dedup); this type only carries frames.
type wsConn struct {
	// Static after construction.
	srv     *Server
	ws      *websocket.Conn
	log     *slog.Logger
	wake    chan struct{} // capacity 1: frames were queued
	closing chan struct{} // closed once, by shutdown()

	// Written once before closing is closed, read by writeLoop after.
	closeOnce  sync.Once
	closeFrame protocol.Close
	abrupt     bool // Terminate: drop the TCP connection, no close frame

	authed    atomic.Bool   // set by readLoop after a successful hello; read by the hello timer
	confirmed atomic.Uint64 // highest write sequence a pong has confirmed; set by the reader

	// Owned by readLoop.
	presence      *services.Conn
	completions   chan completion // pipelined sends, to completeSends; made at the first send, closed by serve
	completerDone chan struct{}   // closed when completeSends has finished
	sendsPending  sync.WaitGroup  // pipelined sends not yet acked; Add by readLoop, Done by completeSends

	// The outbound queue grows on demand up to cfg.OutboxFrames, so an idle
	// socket holds no buffer; guarded by qmu.
	qmu   sync.Mutex
	queue []protocol.Frame

	// Owned by writeLoop (read by Unsent once the writer has exited).
	writeSeq uint64        // frames written so far
	written  []writtenPush // queue pushes written but not yet confirmed by a pong
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
	n := len(w.queue)
	if n >= w.srv.cfg.OutboxFrames {
		w.qmu.Unlock()
		w.srv.svc.Metrics.SlowConsumers.Inc()
		w.log.Warn("slow consumer", "queued", n)
		w.Close(protocol.CloseSlowConsumer)
		return false
	}
	w.queue = append(w.queue, f)
	w.qmu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default: // the writer is already due to look
	}
	return true
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
func (w *wsConn) Close(c protocol.Close) { w.shutdown(c, false) }

// Terminate ends the socket without a close frame; the peer sees 1006.
func (w *wsConn) Terminate() {
	w.shutdown(protocol.Close{}, true)
	_ = w.ws.NetConn().Close() // unblocks both loops at once
}

// trimConfirmed drops written pushes a pong has confirmed. Writer only.
func (w *wsConn) trimConfirmed() {
	c := w.confirmed.Load()
	i := 0
	for i < len(w.written) && w.written[i].seq <= c {
		i++
	}
	if i > 0 {
		w.written = append(w.written[:0], w.written[i:]...)
	}
}

// Unsent returns the messageIds of the queue pushes this socket cannot vouch
// for: written but never confirmed by a pong, or never written at all.
// Called once the writer has exited.
func (w *wsConn) Unsent() []string {
	w.trimConfirmed()
	ids := make([]string, 0, len(w.written))
	for _, p := range w.written {
		ids = append(ids, p.id)
	}
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

func (w *wsConn) shutdown(c protocol.Close, abrupt bool) {
	w.closeOnce.Do(func() {
		w.closeFrame, w.abrupt = c, abrupt
		close(w.closing)
	})
}

// confirmDelay is how soon after writing a queue push the writer pings to
// learn that it arrived, so a socket that dies right after a push can tell
// the push was received or not.
const confirmDelay = 100 * time.Millisecond

// writeLoop writes offered frames and pings, and on close flushes what was
// offered before it, writes the close frame and gives the peer WriteWait to
// answer before the reader's deadline ends the connection.
func (w *wsConn) writeLoop(done chan<- struct{}) {
	defer close(done)
	cfg := w.srv.cfg
	ping := time.NewTicker(cfg.PingInterval)
	defer ping.Stop()
	confirm := time.NewTimer(time.Hour)
	confirm.Stop()
	var confirmC <-chan time.Time // nil unless a confirmation ping is due
	write := func(f protocol.Frame) bool {
		_ = w.ws.SetWriteDeadline(time.Now().Add(cfg.WriteWait))
		if err := w.ws.WriteMessage(websocket.TextMessage, f); err != nil {
			if id, ok := pushMessageID(f); ok {
				w.written = append(w.written, writtenPush{seq: math.MaxUint64, id: id}) // never confirmed
			}
			w.Terminate()
			return false
		}
		w.writeSeq++
		if id, ok := pushMessageID(f); ok {
			w.trimConfirmed()
			w.written = append(w.written, writtenPush{seq: w.writeSeq, id: id})
			if confirmC == nil {
				confirm.Reset(confirmDelay)
				confirmC = confirm.C
			}
		}
		return true
	}
	sendPing := func() bool {
		// The payload is the write sequence; the pong echoes it back.
		payload := strconv.AppendUint(nil, w.writeSeq, 10)
		if err := w.ws.WriteControl(websocket.PingMessage, payload, time.Now().Add(cfg.WriteWait)); err != nil {
			w.Terminate()
			return false
		}
		return true
	}
	var batch []protocol.Frame
	bc, _ := w.ws.NetConn().(*batchConn)
	for {
		select {
		case <-w.wake:
			batch = w.takeQueued(batch)
			held := bc != nil && len(batch) > 1
			if held {
				bc.Hold()
			}
			for i, f := range batch {
				if !write(f) {
					w.requeue(batch[i+1:])
					if held {
						_ = bc.Release()
					}
					return
				}
			}
			if held {
				if err := bc.Release(); err != nil {
					w.Terminate()
					return
				}
			}
		case <-confirmC:
			confirmC = nil
			if !sendPing() {
				return
			}
		case <-ping.C:
			if !sendPing() {
				return
			}
		case <-w.closing:
			if w.abrupt {
				return
			}
			batch = w.takeQueued(batch)
			for i, f := range batch {
				if !write(f) {
					w.requeue(batch[i+1:])
					return
				}
			}
			msg := websocket.FormatCloseMessage(w.closeFrame.Code, w.closeFrame.Reason)
			_ = w.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(cfg.WriteWait))
			// The reader returns when the peer answers the close, or at this
			// deadline: a peer that never answers does not hold shutdown up.
			_ = w.ws.NetConn().SetReadDeadline(time.Now().Add(min(cfg.WriteWait, closeGrace)))
			return
		}
	}
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
	defer s.wg.Done()

	ws, err := s.upgrader.Upgrade(c.Response(), c.Request(), nil)
	if err != nil {
		return nil // the upgrader already answered with an HTTP error
	}
	s.svc.Metrics.ConnectionsTotal.Inc()
	w := &wsConn{
		srv: s, ws: ws, wake: make(chan struct{}, 1), closing: make(chan struct{}),
		log: s.log.With("conn", remoteShort(ws.RemoteAddr())),
	}
	s.mu.Lock()
	s.socks[w] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.socks, w)
		s.mu.Unlock()
	}()
	w.serve()
	return nil
}

func remoteShort(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// serve runs the reader in this goroutine and the writer beside it; both
// have stopped when it returns, and the presence (if any) has been told.
func (w *wsConn) serve() {
	cfg := w.srv.cfg
	writerDone := make(chan struct{})
	go w.writeLoop(writerDone)

	helloTimer := time.AfterFunc(cfg.HelloTimeout, func() {
		if !w.authed.Load() {
			w.Offer(protocol.MustEncode(protocol.ErrorFrame{Type: "error", Code: protocol.CodeHelloTimeout, Message: "no hello within " + cfg.HelloTimeout.String()}))
			w.Close(protocol.HandshakeClose(protocol.CodeHelloTimeout))
		}
	})
	w.ws.SetReadLimit(int64(cfg.MaxMessageBytes))
	_ = w.ws.SetReadDeadline(time.Now().Add(cfg.PongTimeout))
	w.ws.SetPongHandler(func(payload string) error {
		_ = w.ws.SetReadDeadline(time.Now().Add(cfg.PongTimeout))
		if seq, err := strconv.ParseUint(payload, 10, 64); err == nil && seq > w.confirmed.Load() {
			w.confirmed.Store(seq) // only this goroutine stores
		}
		if w.presence != nil {
			w.srv.svc.Presence.Pong(w.presence)
		}
		return nil
	})
	// Any inbound frame proves the peer alive too: a client busy sending has
	// its pong queued behind its own frames, and must not be cut off as
	// stale while the broker works through them. Renewed at most once a
	// second, so a flood of frames costs no extra work.
	lastAlive := time.Now()
	for {
		_, data, err := w.ws.ReadMessage()
		if err != nil {
			w.logReadEnd(err)
			break
		}
		if now := time.Now(); now.Sub(lastAlive) >= time.Second {
			lastAlive = now
			_ = w.ws.SetReadDeadline(now.Add(cfg.PongTimeout))
			if w.presence != nil {
				w.srv.svc.Presence.Pong(w.presence)
			}
		}
		w.dispatch(data)
	}
	helloTimer.Stop()
	// Sends already accepted still get their commit, ack and pushes (the
	// ack may no longer reach this socket; the row is stored either way).
	if w.completions != nil {
		close(w.completions)
		<-w.completerDone
	}
	// Tear the socket down before the presence cleanup, so a reconnecting
	// client never finds this socket still registered as live.
	w.shutdown(protocol.Close{}, true)
	_ = w.ws.NetConn().Close()
	<-writerDone
	if w.presence != nil {
		w.srv.svc.Presence.Closed(w.presence, w)
	}
}

func (w *wsConn) logReadEnd(err error) {
	var ce *websocket.CloseError
	switch {
	case errors.As(err, &ce):
		w.log.Debug("ws closed by peer", "code", ce.Code, "reason", ce.Text)
	case errors.Is(err, websocket.ErrReadLimit):
		w.log.Warn("ws frame too large", "limit", w.srv.cfg.MaxMessageBytes)
	default:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			if w.presence != nil {
				w.log.Warn("ws stale terminate", "presence_id", w.presence.PresenceID)
			}
			return
		}
		w.log.Debug("ws read ended", "err", err)
	}
}
