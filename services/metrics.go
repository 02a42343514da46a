package services

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics holds every collector the broker exports. The reference names and
// labels (03 §8.5) come first; meshbroker's own follow. One registry per
// broker, never the global default, so tests can run brokers side by side.
type Metrics struct {
	Registry *prometheus.Registry

	ConnectionsTotal     prometheus.Counter
	ConnectionsRejected  *prometheus.CounterVec // reason
	ConnectionsActive    prometheus.Gauge
	MessagesRouted       *prometheus.CounterVec // priority
	MessagesRejected     *prometheus.CounterVec // reason
	MessagesDroppedGrant *prometheus.CounterVec // cap
	LegacyAuthHits       prometheus.Counter
	QueueDepth           prometheus.Gauge
	TTLSweeps            *prometheus.CounterVec // flipped
	HookRequests         prometheus.Counter
	HookRateLimited      prometheus.Counter
	DBHealthy            prometheus.Gauge

	OfflineLeases   prometheus.Gauge
	Reattaches      prometheus.Counter
	Evictions       *prometheus.CounterVec // reason: lease_expired, dedup, kick, disconnect, ban, shutdown
	ClaimAge        prometheus.Histogram
	QueueBatchSize  prometheus.Histogram
	SlowConsumers   prometheus.Counter
	AuditPending    prometheus.Gauge
	AuditFailed     prometheus.Counter
	AuditWritten    prometheus.Counter
	DeliveredOnce   prometheus.Counter
	Redelivered     prometheus.Counter
	AcceptLatency   prometheus.Histogram
	ReattachLatency prometheus.Histogram

	// What an operator of a WebSocket broker looks for first.
	DBErrors       *prometheus.CounterVec   // op: failed statements (not "record not found")
	DBQuery        *prometheus.HistogramVec // op: statement latency
	PushAckLatency prometheus.Histogram     // queue push written -> the client's client_ack
	FramesIn       prometheus.Counter
	FramesOut      prometheus.Counter
	BytesIn        prometheus.Counter
	BytesOut       prometheus.Counter
	Closes         *prometheus.CounterVec   // code, by: how sockets ended
	HelloLatency   *prometheus.HistogramVec // kind (hello, session_hello), result (ok, rejected, error)
	DrainDuration  prometheus.Histogram     // one recipient's queue drain, start to idle
	ShutdownTime   prometheus.Gauge         // seconds the last graceful shutdown's socket drain took
	BuildInfo      *prometheus.GaugeVec     // version, revision, goversion; always 1
}

// NewMetrics registers every collector on a fresh registry, including the
// Go runtime and process collectors.
func NewMetrics() *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{Registry: r}
	f := func(c prometheus.Collector) { r.MustRegister(c) }
	m.ConnectionsTotal = prometheus.NewCounter(prometheus.CounterOpts{Name: "broker_connections_total", Help: "WebSocket upgrades accepted"})
	m.ConnectionsRejected = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "broker_connections_rejected_total", Help: "Hellos rejected, by reason"}, []string{"reason"})
	m.ConnectionsActive = prometheus.NewGauge(prometheus.GaugeOpts{Name: "broker_connections_active", Help: "Registry entries (online and offline leases)"})
	m.MessagesRouted = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "broker_messages_routed_total", Help: "Pushes written to recipients, by priority"}, []string{"priority"})
	m.MessagesRejected = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "broker_messages_rejected_total", Help: "Sends or frames rejected, by reason"}, []string{"reason"})
	m.MessagesDroppedGrant = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "broker_messages_dropped_by_grant_total", Help: "Recipients skipped by peer grants, by capability"}, []string{"cap"})
	m.LegacyAuthHits = prometheus.NewCounter(prometheus.CounterOpts{Name: "broker_legacy_auth_hits_total", Help: "Legacy body user_id authentications (not supported by meshbroker; always 0)"})
	m.QueueDepth = prometheus.NewGauge(prometheus.GaugeOpts{Name: "broker_queue_depth", Help: "Undelivered message_queue rows"})
	m.TTLSweeps = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "broker_ttl_sweeps_total", Help: "Working-to-idle TTL sweeps, by number flipped"}, []string{"flipped"})
	m.HookRequests = prometheus.NewCounter(prometheus.CounterOpts{Name: "broker_hook_requests_total", Help: "POST /hook/set-status requests"})
	m.HookRateLimited = prometheus.NewCounter(prometheus.CounterOpts{Name: "broker_hook_requests_rate_limited_total", Help: "Hook requests answered 429"})
	m.DBHealthy = prometheus.NewGauge(prometheus.GaugeOpts{Name: "broker_db_healthy", Help: "1 when the last database ping succeeded"})

	m.OfflineLeases = prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshbroker_offline_leases", Help: "Presences in their grace window"})
	m.Reattaches = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_reattaches_total", Help: "Silent reattaches inside the lease"})
	m.Evictions = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshbroker_evictions_total", Help: "Presences removed, by reason"}, []string{"reason"})
	m.ClaimAge = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshbroker_queue_claim_age_seconds", Help: "Age of a queue row when it was claimed for a push", Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10)})
	m.QueueBatchSize = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshbroker_queue_insert_batch_rows", Help: "Rows per group-commit insert", Buckets: prometheus.ExponentialBuckets(1, 2, 10)})
	m.SlowConsumers = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_slow_consumer_closes_total", Help: "Sockets closed because their outbound queue overflowed"})
	m.AuditPending = prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshbroker_audit_pending", Help: "Audit entries waiting to be written"})
	m.AuditFailed = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_audit_failed_total", Help: "Audit entries that could not be written"})
	m.AuditWritten = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_audit_written_total", Help: "Audit entries appended to the chain"})
	m.DeliveredOnce = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_queue_delivered_total", Help: "Queue rows marked delivered (client_ack, or a pong confirming the push to a client that never acks)"})
	m.Redelivered = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_queue_redelivered_total", Help: "Queue rows released for another push (acking client lost its socket or let the claim expire)"})
	m.AcceptLatency = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshbroker_send_accept_seconds", Help: "send frame to committed row", Buckets: prometheus.ExponentialBuckets(0.0001, 3, 12)})
	m.ReattachLatency = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshbroker_reattach_seconds", Help: "hello received to hello_ack queued, for silent reattaches", Buckets: prometheus.ExponentialBuckets(0.0001, 3, 12)})
	m.DBErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshbroker_db_errors_total", Help: "Database statements that failed, by gorm operation"}, []string{"op"})
	m.DBQuery = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "meshbroker_db_query_seconds", Help: "Database statement latency, by gorm operation", Buckets: prometheus.ExponentialBuckets(0.0001, 3, 12)}, []string{"op"})
	m.PushAckLatency = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshbroker_push_ack_seconds", Help: "Queue push handed to the socket to the recipient's client_ack (pushes a connection received before its first client_ack are confirmed by pong and not timed)", Buckets: prometheus.ExponentialBuckets(0.0005, 3, 12)})
	m.FramesIn = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_ws_frames_received_total", Help: "WebSocket data frames read from peers"})
	m.FramesOut = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_ws_frames_sent_total", Help: "WebSocket data frames written to peers"})
	m.BytesIn = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_ws_received_bytes_total", Help: "Payload bytes of WebSocket data frames read"})
	m.BytesOut = prometheus.NewCounter(prometheus.CounterOpts{Name: "meshbroker_ws_sent_bytes_total", Help: "Payload bytes of WebSocket data frames written"})
	m.Closes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshbroker_ws_closes_total", Help: "WebSockets ended, by close code and by who ended them (broker, peer, network)"}, []string{"code", "by"})
	m.HelloLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "meshbroker_hello_seconds", Help: "hello frame received to hello_ack queued or rejection, by hello kind and result", Buckets: prometheus.ExponentialBuckets(0.0001, 3, 12)}, []string{"kind", "result"})
	m.DrainDuration = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshbroker_queue_drain_seconds", Help: "One recipient's queue drain, from its trigger to nothing left to claim", Buckets: prometheus.ExponentialBuckets(0.0001, 3, 12)})
	m.ShutdownTime = prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshbroker_shutdown_drain_seconds", Help: "How long the last graceful shutdown took to close every socket (0 before any)"})
	m.BuildInfo = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "meshbroker_build_info", Help: "Always 1; the labels say which build is running"}, []string{"version", "revision", "goversion"})

	// Label values known up front are created at zero, so every metric
	// shows up on /metrics before its first event, as the reference's do.
	for _, r := range []string{"capacity", "unauthorized", "revoked", "bad_session_pubkey", "bad_parent_pubkey", "attestation_mismatch",
		"parent_member_id_mismatch", "timestamp_skew", "bad_signature", "malformed"} {
		m.ConnectionsRejected.WithLabelValues(r)
	}
	for _, p := range []string{"now", "next", "low"} {
		m.MessagesRouted.WithLabelValues(p)
	}
	for _, r := range []string{"rate_limit", "too_large", "no_recipient", "parse_or_handler"} {
		m.MessagesRejected.WithLabelValues(r)
	}
	m.MessagesDroppedGrant.WithLabelValues("dm")
	m.MessagesDroppedGrant.WithLabelValues("broadcast")
	m.TTLSweeps.WithLabelValues("0")
	for _, r := range []string{"lease_expired", "dedup", "kick", "disconnect", "ban"} {
		m.Evictions.WithLabelValues(r)
	}
	for _, op := range dbOps {
		m.DBErrors.WithLabelValues(op)
	}

	for _, c := range []prometheus.Collector{
		m.ConnectionsTotal, m.ConnectionsRejected, m.ConnectionsActive, m.MessagesRouted, m.MessagesRejected,
		m.MessagesDroppedGrant, m.LegacyAuthHits, m.QueueDepth, m.TTLSweeps, m.HookRequests, m.HookRateLimited,
		m.DBHealthy, m.OfflineLeases, m.Reattaches, m.Evictions, m.ClaimAge, m.QueueBatchSize, m.SlowConsumers,
		m.AuditPending, m.AuditFailed, m.AuditWritten, m.DeliveredOnce, m.Redelivered, m.AcceptLatency, m.ReattachLatency,
		m.DBErrors, m.DBQuery, m.PushAckLatency, m.FramesIn, m.FramesOut, m.BytesIn, m.BytesOut, m.Closes, m.HelloLatency,
		m.DrainDuration, m.ShutdownTime, m.BuildInfo,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		f(c)
	}
	return m
}
