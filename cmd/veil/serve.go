package main

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseServe(args, stderr)
	if err != nil {
		return err
	}
	if cfg.check {
		fmt.Fprintf(stdout, "veil serve: configuration ok: services %s, pq %s, state %s, require-token %t\n", cfg.services.String(), cfg.pq, *cfg.state.backend, *cfg.tokens.require)
		return nil
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	s, err := buildServe(ctx, cfg, logger)
	if err != nil {
		return err
	}
	defer s.close()
	return s.serve(ctx, cfg.listen, logger)
}

// serveConfig is veil serve's command line and configuration file, checked.
type serveConfig struct {
	identity   string
	id         *identityFlags
	listen     string
	services   stringList
	allow      stringList
	svc        serviceFlags
	tokens     tokenServeFlags
	pq         transport.PQMode
	seal       sealMode // as given: unset resolves against the identity directory
	suite      suiteFlag
	ticketKeys string
	metrics    string
	grace      time.Duration
	state      stateFlags
	rules      []policyRule
	check      bool
	http3      bool
}

// parseServe reads and checks veil serve's flags and configuration file: what --check
// runs, with no identity or network.
func parseServe(args []string, stderr io.Writer) (*serveConfig, error) {
	fs := newFlags("serve", "serve --identity DIR|--ca URL --ca-bundle FILE --join-token TOKEN --id SPIFFE_ID|--spiffe-socket PATH --listen ADDR --service echo [--allow PATTERN ...] [--pq strict|permissive] [--pq-seal strict|permissive|off] [--pq-suite SUITE] [--require-token --token-issuer ID --token-public-key FILE]", stderr)
	cfg := &serveConfig{}
	identity := fs.String("identity", "", "identity directory (tls.crt, tls.key, ca.crt), reloaded when it changes")
	cfg.id = addIdentityFlags(fs)
	listen := fs.String("listen", "127.0.0.1:8443", "address to serve on")
	fs.Var(&cfg.services, "service", "built-in service to run: echo, scoring, analytics, auth (the token service); repeatable")
	cfg.svc = addServiceFlags(fs)
	cfg.tokens = addTokenServeFlags(fs)
	fs.Var(&cfg.allow, "allow", "SPIFFE ID pattern allowed to call the services (exact ID, trust domain, or path with * segments); repeatable; default: the server's own trust domain")
	pq := fs.String("pq", "strict", "TLS key exchange: strict (post-quantum hybrid only; the default) or permissive (also classical-only clients: loud, counted)")
	fs.Var(&cfg.seal, "pq-seal", "end-to-end sealing (pqkex): strict, permissive or off; default strict when the identity directory holds a sealing identity (pq.cred), else off (with --ca the sealing identity comes from the CA with each certificate: pass strict or permissive)")
	fs.Var(&cfg.suite, "pq-suite", pqSuiteUsage+"; when set, sessions of every other suite are refused (reason suite_policy)")
	ticketKeys := fs.String("ticket-keys", "", "pqkex ticket-key file shared by replicas (see 'veil ticket-keys'); reread on SIGHUP")
	metrics := fs.String("metrics", "", "serve Prometheus metrics on this address (plain HTTP)")
	grace := fs.Duration("grace", rpc.DefaultGracePeriod, "how long in-flight calls may finish on shutdown")
	cfg.state = addStateFlags(fs)
	config := fs.String("config", "", "YAML file whose keys are these flags' names (plus policy rules and a state map); flags override it")
	h3 := fs.Bool("http3", false, "also serve HTTP/3 (QUIC) on the UDP port with the --listen port's number, advertised with Alt-Svc (open that UDP port in firewalls)")
	check := fs.Bool("check", false, "validate the flags and configuration file, print what would be served, and exit (no identity or network needed)")
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	if *config != "" {
		var err error
		if cfg.rules, err = applyConfig(fs, *config); err != nil {
			return nil, err
		}
	}
	if len(cfg.services) == 0 {
		return nil, fmt.Errorf("%w: veil serve needs at least one --service", errUsage)
	}
	mode, err := transport.ParsePQMode(*pq)
	if err != nil {
		return nil, fmt.Errorf("%w: --pq: %v", errUsage, err)
	}
	if err := validateServe(cfg.services, cfg.allow, cfg.rules, cfg.state, cfg.svc); err != nil {
		return nil, err
	}
	if err := cfg.tokens.check(cfg.services); err != nil {
		return nil, err
	}
	cfg.identity, cfg.listen, cfg.pq = *identity, *listen, mode
	cfg.ticketKeys, cfg.metrics, cfg.grace, cfg.check = *ticketKeys, *metrics, *grace, *check
	cfg.http3 = *h3
	return cfg, nil
}

// serving is a built veil server, not yet listening.
type serving struct {
	srv       *rpc.Server
	logFields []any // what the readiness line says about it
	closers   []func()
}

// close releases the identity source and the shared state, last opened first.
func (s *serving) close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
}

// buildServe builds the server cfg describes: its identity, shared state, sealing layer,
// services and policy. On error it releases what it opened.
func buildServe(ctx context.Context, cfg *serveConfig, logger *slog.Logger) (_ *serving, err error) {
	s := &serving{}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	wid, err := cfg.id.source(ctx, cfg.identity, logger)
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, wid.close)
	src := wid.src
	svid, err := src.GetX509SVID()
	if err != nil {
		return nil, err
	}
	allow := cfg.allow
	if len(allow) == 0 {
		allow = stringList{"spiffe://" + svid.ID.TrustDomain().Name()}
	}
	policy := rpc.NewPolicy()
	opts := []rpc.ServerOption{rpc.WithPQMode(cfg.pq), rpc.WithPolicy(policy), rpc.WithGracePeriod(cfg.grace), rpc.WithLogger(logger)}
	if cfg.metrics != "" {
		opts = append(opts, rpc.WithMetricsAddr(cfg.metrics))
	}
	if cfg.http3 {
		opts = append(opts, rpc.WithHTTP3())
	}
	// One registry for the server's and the sealing layer's metrics.
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts = append(opts, rpc.WithMetrics(reg))
	seal := cfg.seal.resolve(cfg.identity)
	if cfg.suite.s != nil && (seal.off || seal.mode != pqkex.Strict) {
		// A required suite that plaintext calls could bypass would be a silent fallback.
		return nil, fmt.Errorf("%w: --pq-suite needs --pq-seal strict (sealing is %s)", errUsage, seal.String())
	}
	shared, err := cfg.state.open(ctx, src, cfg.services, !seal.off && cfg.ticketKeys == "", logger)
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, shared.close)
	if !seal.off {
		tk := shared.ticketKeys()
		if cfg.ticketKeys != "" {
			if tk, err = rpc.LoadTicketKeys(cfg.ticketKeys); err != nil {
				return nil, err
			}
			go reloadTicketKeysOnHangup(ctx, cfg.ticketKeys, tk, logger)
		}
		var sealer *pqkex.Server
		if wid.sealing != nil {
			sealer, err = newSealingServerFrom(wid.sealing, seal.mode, reg, tk, append(shared.sealingOptions(), cfg.suite.serverPolicy()...)...)
		} else {
			sealer, err = newSealingServer(cfg.identity, seal.mode, reg, tk, append(shared.sealingOptions(), cfg.suite.serverPolicy()...)...)
		}
		if err != nil {
			return nil, err
		}
		opts = append(opts, rpc.WithSealing(sealer))
	}
	var builtins []builtin
	var ownTokenKey ed25519.PublicKey
	for _, name := range cfg.services {
		var b builtin
		var err error
		if name == "auth" {
			b, ownTokenKey, err = buildTokenService(cfg.tokens, svid.ID)
		} else {
			b, err = buildService(name, cfg.svc, shared)
		}
		if err != nil {
			return nil, err
		}
		builtins = append(builtins, b)
		opts = append(opts, b.opts...)
		for _, svc := range b.names {
			if err := policy.Allow("/"+svc+"/*", allow...); err != nil {
				return nil, fmt.Errorf("%w: --allow: %v", errUsage, err)
			}
		}
	}
	tokenOpts, err := cfg.tokens.serverOptions(svid.ID, ownTokenKey)
	if err != nil {
		return nil, err
	}
	opts = append(opts, tokenOpts...)
	srv, err := rpc.NewServer(src, opts...)
	if err != nil {
		return nil, err
	}
	if wid.status != nil {
		if err := srv.WatchIdentity(ctx, wid.status, time.Second); err != nil {
			return nil, err
		}
	}
	if err := shared.watch(ctx, srv); err != nil {
		return nil, err
	}
	for _, b := range builtins {
		b.register(srv)
	}
	for _, r := range cfg.rules {
		if err := policy.Allow(r.Procedure, r.Allow...); err != nil {
			return nil, fmt.Errorf("%w: config policy: %v", errUsage, err)
		}
	}
	s.srv = srv
	s.logFields = []any{"id", svid.ID.String(), "services", cfg.services.String(), "pq", cfg.pq.String(), "pq_seal", seal.String(),
		"require_token", *cfg.tokens.require, "http3", cfg.http3, "allow", allow.String(), "cert_expires", svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339)}
	return s, nil
}

// serve listens on addr and serves until ctx ends.
func (s *serving) serve(ctx context.Context, addr string, logger *slog.Logger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	// Logged once the socket is bound: readiness probes may wait for this line.
	logger.Info("veil serving", append([]any{"addr", ln.Addr().String()}, s.logFields...)...)
	if err := s.srv.Serve(ctx, ln); err != nil {
		return err
	}
	logger.Info("veil stopped")
	return nil
}

// validateServe checks what can be checked without an identity or the network: the
// services' names, the policy rules and patterns and the state settings (--pq-seal is
// checked as it is parsed).
func validateServe(services, allow stringList, rules []policyRule, st stateFlags, svc serviceFlags) error {
	for _, name := range services {
		switch name {
		case "echo", "analytics", "auth":
		case "scoring":
			if *svc.scoringModel == "" {
				return fmt.Errorf("%w: --service scoring needs --scoring-model (make one with 'veil model train')", errUsage)
			}
		default:
			return fmt.Errorf("%w: unknown service %q (available: echo, scoring, analytics, auth)", errUsage, name)
		}
	}
	p := rpc.NewPolicy()
	if len(allow) > 0 {
		if err := p.Allow("*", allow...); err != nil {
			return fmt.Errorf("%w: --allow: %v", errUsage, err)
		}
	}
	for _, r := range rules {
		if err := p.Allow(r.Procedure, r.Allow...); err != nil {
			return fmt.Errorf("%w: config policy: %v", errUsage, err)
		}
	}
	return st.check(svc)
}
