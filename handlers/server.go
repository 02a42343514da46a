// Package handlers is the edge: Echo routes and the WebSocket pumps. It
// decodes, calls a service and encodes; it holds no business rules and runs
// no SQL.
package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/labstack/echo/v4"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
	"github.com/claudemesh/meshbroker/toolbox"
)

// Version is the broker version /health reports, as the reference does.
const Version = "0.1.0"

// Services are the collaborators the edge calls.
type Services struct {
	Presence  *services.PresenceService
	Messaging *services.MessagingService
	Status    *services.StatusService
	Health    *services.HealthService
	Audit     AuditReader
	Realtime  *services.Realtime
	Toolbox   *toolbox.Toolbox
	Metrics   *services.Metrics
	Invites   *services.InviteService // POST /join, POST /invites/:code/claim
	MemberAPI *services.MemberAPI     // the member HTTP routes
	MeshVerbs *services.MeshVerbs     // mesh_info, list_bans, topic_members|history|mark_read
	// Ready reports whether the schema is in place (and the expected
	// version recorded), for /health/ready.
	Ready func(ctx context.Context) error
}

// AuditReader answers audit_query and audit_verify.
type AuditReader interface {
	Query(ctx context.Context, meshID string, q services.AuditQuery) (protocol.AuditResult, error)
	Verify(ctx context.Context, meshID string) (protocol.AuditVerifyResult, error)
}

// Server is the HTTP and WebSocket edge on one listener.
//
// Concurrency: socks is guarded by mu; each socket's goroutines are counted
// in wg so Shutdown can wait for every one of them after closing the
// sockets (http.Server.Shutdown neither closes nor waits for hijacked
// connections).
type Server struct {
	cfg      config.Config
	log      *slog.Logger
	svc      Services
	echo     *echo.Echo
	http     *http.Server
	upgrader websocket.Upgrader
	started  time.Time
	now      func() time.Time
	baseCtx  context.Context
	cancel   context.CancelFunc

	mu       sync.Mutex
	socks    map[*wsConn]struct{}
	stopping bool
	wg       sync.WaitGroup

	httpOnce sync.Once // StopAccepting
	httpErr  error
}

// New builds the routes.
func New(cfg config.Config, log *slog.Logger, svc Services, now func() time.Time) *Server {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		cfg: cfg, log: log.With("svc", "edge"), svc: svc, started: now(), now: now, baseCtx: ctx, cancel: cancel,
		socks: map[*wsConn]struct{}{},
		upgrader: websocket.Upgrader{
			// Small read buffers and pooled write buffers: an idle socket
			// should cost a few KB, not the library's defaults.
			ReadBufferSize: 1024, WriteBufferSize: 4096, WriteBufferPool: &sync.Pool{},
			CheckOrigin: func(*http.Request) bool { return true }, // no Origin check: auth is the signed hello
		},
	}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = s.handleError
	e.Use(s.recoverMiddleware, s.corsAndLog)
	e.GET("/ws", s.handleWS)
	e.GET("/health", exact(s.handleHealth))
	e.GET("/health/ready", exact(s.handleReady))
	e.GET("/metrics", exact(echo.WrapHandler(promhttp.HandlerFor(svc.Metrics.Registry, promhttp.HandlerOpts{}))))
	e.POST("/hook/set-status", exact(s.handleHookSetStatus))
	s.routeMeshAPI(e)
	e.RouteNotFound("/*", s.handleNotFound)
	s.echo = e
	s.http = &http.Server{Handler: e, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	return s
}

// Handler is the root HTTP handler (tests may serve it themselves).
func (s *Server) Handler() http.Handler { return s.echo }

// Serve serves on ln until Shutdown. The caller opens ln first, so a port
// in use is an error before anything is served.
func (s *Server) Serve(ln net.Listener) error {
	if err := s.http.Serve(newBatchListener(ln)); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// StopAccepting closes the listener and refuses new WebSocket upgrades;
// it waits (bounded by ctx) for plain HTTP requests in progress. Sockets
// already open keep running. A second call does nothing.
func (s *Server) StopAccepting(ctx context.Context) error {
	s.httpOnce.Do(func() {
		s.mu.Lock()
		s.stopping = true
		s.mu.Unlock()
		s.httpErr = s.http.Shutdown(ctx)
	})
	return s.httpErr
}

func (s *Server) sockets() []*wsConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	socks := make([]*wsConn, 0, len(s.socks))
	for w := range s.socks {
		socks = append(socks, w)
	}
	return socks
}

// StopReading is shutdown's first step on the sockets: each stops handling
// new frames (client_ack excepted), finishes the frame in hand and the
// sends it accepted, whose acks are then queued for writing. Bounded by ctx.
func (s *Server) StopReading(ctx context.Context) {
	socks := s.sockets()
	var wg sync.WaitGroup
	for _, w := range socks {
		wg.Add(1)
		go func() { defer wg.Done(); w.stopReading(ctx) }()
	}
	wg.Wait()
}

// ConfirmPushes flushes every socket, pings it after what it wrote and waits
// up to wait (and ctx) for the pongs that confirm its written pushes, so a
// client that answers pings has them marked delivered, not pushed again by
// the next broker (M3, S2).
func (s *Server) ConfirmPushes(ctx context.Context, wait time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	socks := s.sockets()
	for _, w := range socks {
		if !w.settled() {
			w.requestPing(false) // all at once, so the round trips overlap
		}
	}
	for _, w := range socks {
		w.confirmWritten(ctx)
	}
}

// Shutdown stops accepting, closes every WebSocket with 1001 "shutting
// down" (the presence service has already marked the rows and closed the
// registered ones), and waits for every socket goroutine, bounded by ctx.
func (s *Server) Shutdown(ctx context.Context) error {
	started := time.Now()
	defer func() { s.svc.Metrics.ShutdownTime.Set(time.Since(started).Seconds()) }()
	err := s.StopAccepting(ctx)
	socks := s.sockets()
	for _, w := range socks {
		w.Close(protocol.CloseShuttingDown)
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		for _, w := range socks {
			w.Terminate()
		}
		<-done
		if err == nil {
			err = ctx.Err()
		}
	}
	s.cancel()
	return err
}

// exact makes a route answer 404 unless the raw request target is exactly
// its path: the reference compares targets exactly (`/health?x=1` is 404).
func exact(h echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		if c.Request().RequestURI != c.Path() {
			return echo.ErrNotFound
		}
		return h(c)
	}
}

type errorBody struct {
	OK    *bool  `json:"ok,omitempty"`
	Error string `json:"error"`
}

// handleError is the one place HTTP errors become JSON bodies.
func (s *Server) handleError(err error, c echo.Context) {
	if c.Response().Committed {
		return
	}
	code := http.StatusInternalServerError
	msg := "internal error"
	var he *echo.HTTPError
	if errors.As(err, &he) {
		code = he.Code
		msg = http.StatusText(code)
		if m, ok := he.Message.(string); ok {
			msg = m
		}
	} else {
		s.log.Error("http handler", "path", c.Path(), "err", err)
	}
	if code == http.StatusNotFound {
		msg = "not found"
	}
	_ = c.JSON(code, errorBody{Error: msg})
}

func (s *Server) handleNotFound(c echo.Context) error {
	if websocket.IsWebSocketUpgrade(c.Request()) {
		dropConnection(c) // an upgrade on any target but exactly /ws: no HTTP response at all
		return nil
	}
	return echo.ErrNotFound
}

// dropConnection destroys the TCP connection without writing a response.
func dropConnection(c echo.Context) {
	if hj, ok := c.Response().Writer.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			conn.Close()
			return
		}
	}
	panic(http.ErrAbortHandler) // net/http closes the connection without a response
}

func (s *Server) recoverMiddleware(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) (err error) {
		defer func() {
			if r := recover(); r != nil {
				if r == http.ErrAbortHandler {
					panic(r)
				}
				s.log.Error("http panic", "path", c.Request().URL.Path, "panic", r)
				err = echo.NewHTTPError(http.StatusInternalServerError, "internal error")
			}
		}()
		return next(c)
	}
}

// corsAndLog adds the reference's CORS headers to every response, answers
// OPTIONS with 204, and logs each request.
func (s *Server) corsAndLog(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		h := c.Response().Header()
		h.Set("Access-Control-Allow-Origin", "*")
		h.Set("Access-Control-Allow-Methods", "POST, GET, PATCH, OPTIONS")
		h.Set("Access-Control-Allow-Headers", "Content-Type, X-Mesh-Id, X-Member-Id, X-File-Name, X-Tags, X-Persistent, X-Target-Spec, X-Claudemesh-Timestamp, X-Claudemesh-Signature")
		if c.Request().Method == http.MethodOptions {
			return c.NoContent(http.StatusNoContent)
		}
		start := s.now()
		err := next(c)
		if c.Path() != "/ws" {
			status := c.Response().Status
			var he *echo.HTTPError
			if errors.As(err, &he) {
				status = he.Code
			}
			s.log.Debug("http", "route", c.Request().Method+" "+c.Request().URL.Path, "status", status, "latency_ms", s.now().Sub(start).Milliseconds())
		}
		return err
	}
}

type healthBody struct {
	Status string `json:"status"`
	DB     string `json:"db"`
	Ver    string `json:"version"`
	GitSHA string `json:"gitSha"`
	Uptime int64  `json:"uptime"`
}

// gitSHA is the revision /health reports: the same string as the start
// line's gitSha and build_info's revision ("unknown" when GIT_SHA is unset).
func (s *Server) gitSHA() string { return s.cfg.BuildRevision() }

// handleHealth is liveness (S4): always 200, with the cached db state.
func (s *Server) handleHealth(c echo.Context) error {
	db := "down"
	if s.svc.Health.Healthy() {
		db = "up"
	}
	return c.JSON(http.StatusOK, healthBody{Status: "ok", DB: db, Ver: Version, GitSHA: s.gitSHA(), Uptime: int64(s.now().Sub(s.started).Seconds())})
}

// handleReady is readiness (S4): 503 while the database is down or the
// schema is not in place.
func (s *Server) handleReady(c echo.Context) error {
	if !s.svc.Health.Healthy() {
		return c.JSON(http.StatusServiceUnavailable, map[string]string{"status": "not_ready", "reason": "db_down"})
	}
	if err := s.svc.Ready(c.Request().Context()); err != nil {
		body := map[string]string{"status": "not_ready", "reason": "schema_missing", "error": err.Error()}
		if s.cfg.ExpectedSchema != "" {
			body["reason"], body["expected"] = "migration_missing", s.cfg.ExpectedSchema
		}
		return c.JSON(http.StatusServiceUnavailable, body)
	}
	// Healthy was checked above and the schema query just succeeded.
	return c.JSON(http.StatusOK, healthBody{Status: "ready", DB: "up", Ver: Version, GitSHA: s.gitSHA(), Uptime: int64(s.now().Sub(s.started).Seconds())})
}

type hookBody struct {
	Cwd    json.RawMessage `json:"cwd"`
	Pid    json.RawMessage `json:"pid"`
	Status json.RawMessage `json:"status"`
}

type hookReply struct {
	OK         bool   `json:"ok"`
	Error      string `json:"error,omitempty"`
	Pending    bool   `json:"pending,omitempty"`
	PresenceID string `json:"presence_id,omitempty"`
}

// handleHookSetStatus is POST /hook/set-status (03 §3.2), in its order:
// count, size cap, parse, per-address limit, text checks, per-(pid, cwd)
// limit, validate, apply, drain. The route is unauthenticated, so nothing
// a request sends is kept before it has passed the per-address limit and
// the cwd length cap (issue 13).
func (s *Server) handleHookSetStatus(c echo.Context) error {
	s.svc.Metrics.HookRequests.Inc()
	start := s.now()
	body, err := io.ReadAll(io.LimitReader(c.Request().Body, int64(s.cfg.MaxMessageBytes)+1))
	if err != nil {
		return c.JSON(http.StatusBadRequest, hookReply{Error: "could not read body"})
	}
	if len(body) > s.cfg.MaxMessageBytes {
		c.Response().Header().Set("Connection", "close")
		return c.JSON(http.StatusRequestEntityTooLarge, hookReply{Error: "payload too large"})
	}
	var req hookBody
	if err := json.Unmarshal(body, &req); err != nil {
		// The reference answers a parse failure with 500; we keep the
		// status code so hook clients behave the same.
		return c.JSON(http.StatusInternalServerError, hookReply{Error: "invalid JSON: " + err.Error()})
	}
	addr := s.clientAddr(c.Request())
	if !s.svc.Status.HookAddrAllowed(addr) {
		s.svc.Metrics.HookRateLimited.Inc()
		s.log.Warn("hook rate limited", "addr", addr.String())
		return c.JSON(http.StatusTooManyRequests, hookReply{Error: "rate limited"})
	}
	if len(req.Cwd) > services.MaxHookCwdBytes+2 { // the raw value: its quotes and escapes count
		if cwd, _ := protocol.RawString(req.Cwd); len(cwd) > services.MaxHookCwdBytes {
			return c.JSON(http.StatusBadRequest, hookReply{Error: fmt.Sprintf("cwd longer than %d bytes", services.MaxHookCwdBytes)})
		}
	}
	if err := protocol.CheckStorableText(body); err != nil {
		return c.JSON(http.StatusBadRequest, hookReply{Error: err.Error()})
	}
	cwd, _ := protocol.RawString(req.Cwd)
	status, _ := protocol.RawString(req.Status)
	pidF, _ := protocol.RawNumber(req.Pid)
	pid := int(pidF)
	if !s.svc.Status.HookAllowed(pid, cwd) {
		s.svc.Metrics.HookRateLimited.Inc()
		// No cwd above debug: it is a local path, and hooks fire per tool call.
		s.log.Warn("hook rate limited", "addr", addr.String(), "pid", pid)
		return c.JSON(http.StatusTooManyRequests, hookReply{Error: "rate limited"})
	}
	if cwd == "" || status == "" {
		return c.JSON(http.StatusOK, hookReply{Error: "cwd and status required"})
	}
	if !services.ValidStatus(status) {
		return c.JSON(http.StatusBadRequest, hookReply{Error: "invalid status"})
	}
	res, err := s.svc.Status.Hook(c.Request().Context(), services.HookRequest{Cwd: cwd, Pid: pid, Status: status})
	if errors.Is(err, services.ErrPendingFull) {
		s.svc.Metrics.HookRateLimited.Inc()
		s.log.Warn("hook not parked: pending_status full", "addr", addr.String(), "max", s.cfg.HookPendingMax)
		return c.JSON(http.StatusTooManyRequests, hookReply{Error: "too many pending statuses"})
	}
	if err != nil {
		s.log.Error("hook handler error", "err", err)
		return c.JSON(http.StatusInternalServerError, hookReply{Error: "internal error"})
	}
	s.log.Debug("hook", "route", "POST /hook/set-status", "cwd", logCwd(cwd), "pid", pid, "status", status, "presence_id", res.PresenceID,
		"pending", res.Pending, "latency_ms", s.now().Sub(start).Milliseconds())
	if res.Pending {
		return c.JSON(http.StatusOK, hookReply{OK: true, Pending: true})
	}
	s.svc.Messaging.TriggerDrain(res.PresenceID)
	return c.JSON(http.StatusOK, hookReply{OK: true, PresenceID: res.PresenceID})
}

// logCwd keeps a hook's cwd short enough for a log line.
func logCwd(cwd string) string {
	const max = 256
	if len(cwd) <= max {
		return cwd
	}
	return cwd[:max] + "..."
}
