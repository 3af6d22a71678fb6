package rpc

import (
	"context"
	"crypto/tls"
	"maps"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilrpc/veil/transport"
)

// Metrics holds a server's or client's Prometheus collectors. Labels never carry
// secrets: procedures, codes, TLS groups and refusal reasons only.
type Metrics struct {
	calls      *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	handshakes *prometheus.CounterVec
	refused    *prometheus.CounterVec
	// authRefused counts calls WithBoundTokens refused, by procedure and reason.
	authRefused *prometheus.CounterVec

	// procs holds each procedure's series of successful calls, resolved once: a label
	// lookup hashes the label values and takes the vector's lock on every call. The map
	// is copied on write (procedures are the registered handlers', a bounded set).
	procs   atomic.Pointer[map[string]*procMetrics]
	procsMu sync.Mutex
}

// procMetrics are one procedure's series for calls that end without error.
type procMetrics struct {
	ok      prometheus.Counter
	latency prometheus.Observer
}

// forProcedure returns procedure's series, resolving them on its first call.
func (m *Metrics) forProcedure(procedure string) *procMetrics {
	if pm := m.procs.Load(); pm != nil {
		if p, ok := (*pm)[procedure]; ok {
			return p
		}
	}
	m.procsMu.Lock()
	defer m.procsMu.Unlock()
	old := m.procs.Load()
	if old != nil {
		if p, ok := (*old)[procedure]; ok {
			return p
		}
	}
	var next map[string]*procMetrics
	if old != nil {
		next = maps.Clone(*old)
	} else {
		next = map[string]*procMetrics{}
	}
	p := &procMetrics{ok: m.calls.WithLabelValues(procedure, "ok"), latency: m.latency.WithLabelValues(procedure)}
	next[procedure] = p
	m.procs.Store(&next)
	return p
}

func newMetrics(reg prometheus.Registerer, side string) *Metrics {
	constLabels := prometheus.Labels{"side": side}
	m := &Metrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_rpc_calls_total", Help: "RPCs by procedure and Connect code.", ConstLabels: constLabels,
		}, []string{"procedure", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "veil_rpc_duration_seconds", Help: "RPC latency by procedure.", ConstLabels: constLabels,
			Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 14),
		}, []string{"procedure"}),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_tls_handshakes_total", Help: "Completed TLS handshakes by negotiated group.", ConstLabels: constLabels,
		}, []string{"group", "post_quantum", "resumed"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_tls_handshake_failures_total", Help: "Refused TLS handshakes by reason.", ConstLabels: constLabels,
		}, []string{"reason"}),
		authRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_rpc_auth_refusals_total", Help: "Calls refused for their access token (WithBoundTokens), by procedure and reason (AuthReason*).", ConstLabels: constLabels,
		}, []string{"procedure", "reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.calls, m.latency, m.handshakes, m.refused, m.authRefused)
	}
	return m
}

// CounterValue sums the counter name in g over the series whose label has value (0
// when there is none): for reports and tests, for example a server's
// veil_rpc_auth_refusals_total with reason AuthReasonExpired.
func CounterValue(g prometheus.Gatherer, name, label, value string) (float64, error) {
	mfs, err := g.Gather()
	if err != nil {
		return 0, err
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum, nil
}

// HandshakeDone implements transport.Observer.
func (m *Metrics) HandshakeDone(g tls.CurveID, resumed bool) {
	m.handshakes.WithLabelValues(g.String(), strconv.FormatBool(transport.IsPQGroup(g)), strconv.FormatBool(resumed)).Inc()
}

// HandshakeFailed implements transport.Observer.
func (m *Metrics) HandshakeFailed(reason transport.Reason) {
	m.refused.WithLabelValues(string(reason)).Inc()
}

func (m *Metrics) observe(procedure string, start time.Time, err error) {
	p := m.forProcedure(procedure)
	if err != nil {
		m.calls.WithLabelValues(procedure, connect.CodeOf(err).String()).Inc()
	} else {
		p.ok.Inc()
	}
	p.latency.Observe(time.Since(start).Seconds())
}

// interceptor counts every call by procedure and code.
func (m *Metrics) interceptor() connect.Interceptor { return metricsInterceptor{m} }

type metricsInterceptor struct{ m *Metrics }

func (i metricsInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		start := time.Now()
		res, err := next(ctx, req)
		i.m.observe(req.Spec().Procedure, start, err)
		return res, err
	}
}

func (i metricsInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (i metricsInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		start := time.Now()
		err := next(ctx, conn)
		i.m.observe(conn.Spec().Procedure, start, err)
		return err
	}
}

// handshakeLog classifies the TLS handshake errors that net/http logs but that never
// reach a TLS callback (a plaintext client, a peer that hung up), so that they are
// counted too. Refusals decided by transport's callbacks are counted there already.
type handshakeLog struct{ m *Metrics }

func (h handshakeLog) Write(p []byte) (int, error) {
	line := string(p)
	if !strings.Contains(line, "TLS handshake error") || strings.Contains(line, "transport: handshake refused") {
		return len(p), nil
	}
	switch {
	case strings.Contains(line, "does not look like a TLS handshake"), strings.Contains(line, "HTTP request to an HTTPS server"):
		h.m.HandshakeFailed(transport.ReasonNotTLS)
	case strings.Contains(line, "remote error"):
		h.m.HandshakeFailed(transport.ReasonPeerAlert)
	case strings.Contains(line, "EOF"), strings.Contains(line, "connection reset"):
		h.m.HandshakeFailed(transport.ReasonPeerClosed)
	default:
		h.m.HandshakeFailed(transport.ReasonOther)
	}
	return len(p), nil
}
