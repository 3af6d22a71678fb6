package rpc

import (
	"context"
	"time"

	"connectrpc.com/grpchealth"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilrpc/veil/transport"
)

// IdentityStatus is implemented by identity sources that renew themselves and know
// when they are in trouble, such as transport.RenewingSource.
type IdentityStatus interface {
	Status() transport.RenewStatus
}

// WatchIdentity ties the server's health and metrics to a renewing identity: while src
// reports unhealthy (renewal has failed long enough that the certificate's remaining
// lifetime fell under its threshold), every service and the server as a whole are
// NOT_SERVING in grpc.health.v1, before the certificate expires; they are SERVING
// again once a renewal succeeds. It exports veil_identity_expiry_seconds,
// veil_identity_healthy, veil_identity_renewals_total and
// veil_identity_renewal_failures_total. It checks every interval until ctx ends.
func (s *Server) WatchIdentity(ctx context.Context, src IdentityStatus, interval time.Duration) error {
	collectors := []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "veil_identity_expiry_seconds", Help: "Seconds until the workload certificate expires."},
			func() float64 { return src.Status().Remaining.Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "veil_identity_healthy", Help: "1 while the workload certificate is renewed in time, 0 once it is about to expire."},
			func() float64 {
				if src.Status().Healthy {
					return 1
				}
				return 0
			}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "veil_identity_renewals_total", Help: "Successful certificate renewals."},
			func() float64 { return float64(src.Status().Renewals) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "veil_identity_renewal_failures_total", Help: "Failed certificate renewal attempts."},
			func() float64 { return float64(src.Status().Failures) }),
	}
	for _, c := range collectors {
		if err := s.cfg.registry.Register(c); err != nil {
			return err
		}
	}
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		healthy := true
		for {
			st := src.Status()
			if st.Healthy != healthy {
				healthy = st.Healthy
				if !healthy {
					s.cfg.logger.Warn("rpc: identity about to expire; reporting NOT_SERVING", "id", st.ID.String(),
						"expires", st.NotAfter.UTC().Format(time.RFC3339), "last_error", st.LastError)
				} else {
					s.cfg.logger.Info("rpc: identity renewed; reporting SERVING", "id", st.ID.String())
				}
				s.setServing(healthy)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return nil
}

// setServing sets every service's health, unless the server is shutting down.
func (s *Server) setServing(ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shutdown {
		return
	}
	status := grpchealth.StatusNotServing
	if ok {
		status = grpchealth.StatusServing
	}
	s.health.SetStatus("", status)
	for _, svc := range s.services {
		s.health.SetStatus(svc, status)
	}
}
