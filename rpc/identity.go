package rpc

import (
	"context"
	"sync/atomic"
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
				s.setDegraded("identity", !healthy)
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

// Dependency is something the services need in order to serve, such as the shared
// state store of package natsstate: Check returns nil while it works.
type Dependency interface {
	Check(ctx context.Context) error
}

// WatchDependency ties the server's health to dep: while dep's Check fails, every
// service and the server as a whole are NOT_SERVING in grpc.health.v1 (so a load
// balancer sends calls elsewhere; the calls that still arrive get the services' own
// errors, such as unavailable), and SERVING again once it succeeds. It exports
// veil_dependency_up{dependency=name} and checks every interval (each check bounded
// by the interval) until ctx ends.
func (s *Server) WatchDependency(ctx context.Context, name string, dep Dependency, interval time.Duration) error {
	var up atomic.Bool
	up.Store(true)
	g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "veil_dependency_up", Help: "1 while a dependency the services need answers its checks.", ConstLabels: prometheus.Labels{"dependency": name}},
		func() float64 {
			if up.Load() {
				return 1
			}
			return 0
		})
	if err := s.cfg.registry.Register(g); err != nil {
		return err
	}
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			cctx, cancel := context.WithTimeout(ctx, interval)
			err := dep.Check(cctx)
			cancel()
			if ctx.Err() != nil {
				return
			}
			if ok := err == nil; ok != up.Load() {
				up.Store(ok)
				if !ok {
					s.cfg.logger.Warn("rpc: dependency failing; reporting NOT_SERVING", "dependency", name, "error", err.Error())
				} else {
					s.cfg.logger.Info("rpc: dependency back; reporting SERVING", "dependency", name)
				}
				s.setDegraded("dependency:"+name, !ok)
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

// setDegraded records whether reason keeps the server from serving, and sets every
// service's health: SERVING only while no reason holds, unless the server is shutting
// down.
func (s *Server) setDegraded(reason string, bad bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.degraded == nil {
		s.degraded = map[string]bool{}
	}
	if bad {
		s.degraded[reason] = true
	} else {
		delete(s.degraded, reason)
	}
	if s.shutdown {
		return
	}
	status := grpchealth.StatusServing
	if len(s.degraded) > 0 {
		status = grpchealth.StatusNotServing
	}
	s.health.SetStatus("", status)
	for _, svc := range s.services {
		s.health.SetStatus(svc, status)
	}
}
