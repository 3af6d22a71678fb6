package pqkex

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are pqkex's counters. Labels carry only sides, reasons and outcomes, never
// identities or key material.
type metrics struct {
	rejections *prometheus.CounterVec // side, reason
	handshakes *prometheus.CounterVec // side, result
	calls      *prometheus.CounterVec // side, sealed
	rekeys     *prometheus.CounterVec // side, kind (session or stream)
	insecure   *prometheus.CounterVec // side: sessions made under InsecureAcceptAnyServer
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_pqkex_rejections_total",
			Help: "Calls, frames and handshakes pqkex rejected, by side and reason (docs/pqkex.md section 9).",
		}, []string{"side", "reason"}),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_pqkex_handshakes_total",
			Help: "pqkex handshakes by side and result.",
		}, []string{"side", "result"}),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_pqkex_calls_total",
			Help: "Calls seen by pqkex, by side and whether they were sealed.",
		}, []string{"side", "sealed"}),
		rekeys: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_pqkex_rekeys_total",
			Help: "Fresh-KEM rekeys by side and kind: session (a new handshake replacing a used-up session) or stream (a REKEY frame).",
		}, []string{"side", "kind"}),
		insecure: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_pqkex_insecure_sessions_total",
			Help: "Sessions a client made without naming the server it expects (InsecureAcceptAnyServer).",
		}, []string{"side"}),
	}
	if reg != nil {
		m.rejections = register(reg, m.rejections)
		m.handshakes = register(reg, m.handshakes)
		m.calls = register(reg, m.calls)
		m.rekeys = register(reg, m.rekeys)
		m.insecure = register(reg, m.insecure)
	}
	return m
}

// register registers c, or returns the collector already registered under its name, so a
// server and a client in one process can share a registry.
func register(reg prometheus.Registerer, c *prometheus.CounterVec) *prometheus.CounterVec {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(*prometheus.CounterVec); ok {
				return existing
			}
		}
	}
	return c
}

// sideCounters are the per-call counters of one side, resolved once: WithLabelValues hashes
// its labels and looks them up on every use.
type sideCounters struct {
	sealed, plain, streamRekeys prometheus.Counter
}

func (m *metrics) forSide(side string) sideCounters {
	return sideCounters{
		sealed:       m.calls.WithLabelValues(side, "true"),
		plain:        m.calls.WithLabelValues(side, "false"),
		streamRekeys: m.rekeys.WithLabelValues(side, "stream"),
	}
}

func (m *metrics) reject(side string, err error) {
	m.rejections.WithLabelValues(side, string(reasonOf(err))).Inc()
}
