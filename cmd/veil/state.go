package main

import (
	"context"
	"crypto/x509"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"time"

	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/natsstate"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
	"github.com/veilrpc/veil/transport"
)

// stateFlags select where a server keeps what its replicas must share: embedded (this
// process, plus the --keys-store and --analytics-store directories) or NATS JetStream.
type stateFlags struct {
	backend  *string
	url      *string
	replicas *int
	ca       *string
	prefix   *string
	period   *time.Duration
	wait     *time.Duration
	replay   *stringList
}

func addStateFlags(fs *flag.FlagSet) stateFlags {
	replay := new(stringList)
	fs.Var(replay, "state-replay-procedure", "with --state nats: a procedure (request path, e.g. /acme.v1.Payments/Pay) whose sealed calls every replica checks against this service's shared replay store, so a replayed call runs once (docs/pqkex.md section 6.4; one NATS round trip per call); repeatable")
	return stateFlags{
		replay:   replay,
		backend:  fs.String("state", "embedded", "where replicas' shared state lives: embedded (this process and the --*-store directories) or nats (NATS JetStream: evaluation keys, ticket keys, analytics)"),
		url:      fs.String("state-url", "", "with --state nats: the NATS servers, comma-separated (tls://nats-0:4222,...)"),
		replicas: fs.Int("state-replicas", 1, "with --state nats: replication factor of the buckets Veil creates (3 for a three-node cluster)"),
		ca:       fs.String("state-ca", "", "with --state nats: PEM roots for the NATS servers' certificates (default: the workload's trust bundle)"),
		prefix:   fs.String("state-prefix", "veil", "with --state nats: prefix of the bucket names"),
		period:   fs.Duration("state-ticket-key-period", time.Hour, "with --state nats: how often replicas rotate this service's pqkex ticket key; a key opens tickets one period longer and is then erased, and no ticket outlives it (docs/pqkex.md section 7.2)"),
		wait:     fs.Duration("state-wait", time.Minute, "with --state nats: how long to keep trying to reach NATS at start before giving up"),
	}
}

// check validates the state flags without connecting.
func (f stateFlags) check(svc serviceFlags) error {
	switch *f.backend {
	case "embedded":
		if len(*f.replay) > 0 {
			return fmt.Errorf("%w: --state-replay-procedure needs --state nats", errUsage)
		}
		return nil
	case "nats":
	default:
		return fmt.Errorf("%w: --state %q: want embedded or nats", errUsage, *f.backend)
	}
	switch {
	case *f.url == "":
		return fmt.Errorf("%w: --state nats needs --state-url", errUsage)
	case *f.replicas < 1 || *f.replicas > 5:
		return fmt.Errorf("%w: --state-replicas %d: JetStream allows 1 to 5", errUsage, *f.replicas)
	case *f.period < 10*time.Second:
		return fmt.Errorf("%w: --state-ticket-key-period %v: at least 10s", errUsage, *f.period)
	case *svc.keysStore != "" || *svc.analyticsStore != "":
		return fmt.Errorf("%w: --keys-store and --analytics-store are for --state embedded; with nats the buckets hold that state", errUsage)
	}
	return nil
}

// sharedState is what a server keeps in NATS; its fields are nil with the embedded
// backend.
type sharedState struct {
	conn      *natsstate.State
	keys      keys.KeyStore
	studies   analytics.Store
	tickets   *natsstate.TicketKeys
	replay    *natsstate.ReplayStore // for the procedures of --state-replay-procedure
	replayFor []string
}

// open connects to NATS for the services and sealing that need it, retrying for up to
// --state-wait: NATS may still be electing leaders when replicas start.
func (f stateFlags) open(ctx context.Context, src transport.Source, services []string, sealing bool, logger *slog.Logger) (*sharedState, error) {
	if *f.backend != "nats" {
		return &sharedState{}, nil
	}
	deadline := time.Now().Add(*f.wait)
	for {
		st, err := f.openOnce(ctx, src, services, sealing, logger)
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return st, err
		}
		logger.Warn("shared state not reachable yet; retrying", "error", err.Error())
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
}

func (f stateFlags) openOnce(ctx context.Context, src transport.Source, services []string, sealing bool, logger *slog.Logger) (*sharedState, error) {
	cfg := natsstate.Config{URL: *f.url, Replicas: *f.replicas, Prefix: *f.prefix, Source: src, Logger: logger}
	if *f.ca != "" {
		b, err := os.ReadFile(*f.ca)
		if err != nil {
			return nil, fmt.Errorf("--state-ca: %w", err)
		}
		cfg.Roots = x509.NewCertPool()
		if !cfg.Roots.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("--state-ca %s: no PEM certificate", *f.ca)
		}
	}
	conn, err := natsstate.Connect(ctx, cfg)
	if err != nil {
		return nil, err
	}
	st := &sharedState{conn: conn}
	for _, name := range services {
		switch name {
		case "scoring":
			if st.keys, err = conn.EvaluationKeys(ctx); err != nil {
				conn.Close()
				return nil, err
			}
		case "analytics":
			if st.studies, err = conn.Studies(ctx); err != nil {
				conn.Close()
				return nil, err
			}
		}
	}
	if sealing {
		// The keys of this service only (its own bucket): docs/pqkex.md section 7.1.
		svid, err := src.GetX509SVID()
		if err != nil {
			conn.Close()
			return nil, err
		}
		if st.tickets, err = conn.TicketKeys(ctx, svid.ID.String(), *f.period); err != nil {
			conn.Close()
			return nil, err
		}
		go st.tickets.Run(ctx)
	}
	if len(*f.replay) > 0 {
		svid, err := src.GetX509SVID()
		if err != nil {
			conn.Close()
			return nil, err
		}
		// Records live as long as the longest ticket (pqkex's default lifetime, one hour).
		if st.replay, err = conn.ReplayStore(ctx, svid.ID.String()); err != nil {
			conn.Close()
			return nil, err
		}
		st.replayFor = *f.replay
	}
	logger.Info("shared state on NATS JetStream", "url", *f.url, "replicas", *f.replicas, "prefix", *f.prefix)
	return st, nil
}

// ticketKeys returns the shared ticket keys, if any.
func (s *sharedState) ticketKeys() *pqkex.TicketKeys {
	if s.tickets == nil {
		return nil
	}
	return s.tickets.Keys()
}

// sealingOptions are the pqkex server options the shared state adds: the replay store.
func (s *sharedState) sealingOptions() []pqkex.ServerOption {
	if s.replay == nil {
		return nil
	}
	return []pqkex.ServerOption{pqkex.WithReplayStore(s.replay, func(p string) bool { return slices.Contains(s.replayFor, p) })}
}

// watch ties the server's health to NATS.
func (s *sharedState) watch(ctx context.Context, srv *rpc.Server) error {
	if s.conn == nil {
		return nil
	}
	return srv.WatchDependency(ctx, "nats", s.conn, 2*time.Second)
}

func (s *sharedState) close() {
	if s.conn != nil {
		s.conn.Close()
	}
}
