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
	fs := newFlags("serve", "serve --identity DIR|--ca URL --ca-bundle FILE --join-token TOKEN --id SPIFFE_ID|--spiffe-socket PATH --listen ADDR --service echo [--allow PATTERN ...] [--pq strict|permissive] [--pq-seal strict|permissive|off] [--require-token --token-issuer ID --token-public-key FILE]", stderr)
	identity := fs.String("identity", "", "identity directory (tls.crt, tls.key, ca.crt), reloaded when it changes")
	idFlags := addIdentityFlags(fs)
	listen := fs.String("listen", "127.0.0.1:8443", "address to serve on")
	var services, allow stringList
	fs.Var(&services, "service", "built-in service to run: echo, scoring, analytics, auth (the token service); repeatable")
	svcFlags := addServiceFlags(fs)
	tokFlags := addTokenServeFlags(fs)
	fs.Var(&allow, "allow", "SPIFFE ID pattern allowed to call the services (exact ID, trust domain, or path with * segments); repeatable; default: the server's own trust domain")
	pq := fs.String("pq", "permissive", "TLS key exchange: strict (post-quantum hybrid only) or permissive")
	seal := fs.String("pq-seal", "", "end-to-end sealing (pqkex): strict, permissive or off; default strict when the identity directory holds a sealing identity (pq.cred), else off (with --ca the sealing identity comes from the CA with each certificate: pass strict or permissive)")
	ticketKeys := fs.String("ticket-keys", "", "pqkex ticket-key file shared by replicas (see 'veil ticket-keys'); reread on SIGHUP")
	metrics := fs.String("metrics", "", "serve Prometheus metrics on this address (plain HTTP)")
	grace := fs.Duration("grace", rpc.DefaultGracePeriod, "how long in-flight calls may finish on shutdown")
	stFlags := addStateFlags(fs)
	config := fs.String("config", "", "YAML file whose keys are these flags' names (plus policy rules and a state map); flags override it")
	check := fs.Bool("check", false, "validate the flags and configuration file, print what would be served, and exit (no identity or network needed)")
	if err := parse(fs, args); err != nil {
		return err
	}
	var rules []policyRule
	if *config != "" {
		var err error
		if rules, err = applyConfig(fs, *config); err != nil {
			return err
		}
	}
	if len(services) == 0 {
		return fmt.Errorf("%w: veil serve needs at least one --service", errUsage)
	}
	mode, err := transport.ParsePQMode(*pq)
	if err != nil {
		return fmt.Errorf("%w: --pq: %v", errUsage, err)
	}
	if err := validateServe(services, allow, rules, *seal, stFlags, svcFlags); err != nil {
		return err
	}
	if err := tokFlags.check(services); err != nil {
		return err
	}
	if *check {
		fmt.Fprintf(stdout, "veil serve: configuration ok: services %s, pq %s, state %s, require-token %t\n", services.String(), mode, *stFlags.backend, *tokFlags.require)
		return nil
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	wid, err := idFlags.source(ctx, *identity, logger)
	if err != nil {
		return err
	}
	defer wid.close()
	src := wid.src
	svid, err := src.GetX509SVID()
	if err != nil {
		return err
	}
	if len(allow) == 0 {
		allow = stringList{"spiffe://" + svid.ID.TrustDomain().Name()}
	}
	policy := rpc.NewPolicy()
	opts := []rpc.ServerOption{rpc.WithPQMode(mode), rpc.WithPolicy(policy), rpc.WithGracePeriod(*grace), rpc.WithLogger(logger)}
	if *metrics != "" {
		opts = append(opts, rpc.WithMetricsAddr(*metrics))
	}
	// One registry for the server's and the sealing layer's metrics.
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts = append(opts, rpc.WithMetrics(reg))
	sealMode, err := sealingMode(*seal, *identity)
	if err != nil {
		return err
	}
	shared, err := stFlags.open(ctx, src, services, sealMode != "off" && *ticketKeys == "", logger)
	if err != nil {
		return err
	}
	defer shared.close()
	if sealMode != "off" {
		tk := shared.ticketKeys()
		if *ticketKeys != "" {
			if tk, err = rpc.LoadTicketKeys(*ticketKeys); err != nil {
				return err
			}
			go reloadTicketKeysOnHangup(ctx, *ticketKeys, tk, logger)
		}
		var sealer *pqkex.Server
		if wid.sealing != nil {
			sealer, err = newSealingServerFrom(wid.sealing, sealMode, reg, tk, shared.sealingOptions()...)
		} else {
			sealer, err = newSealingServer(*identity, sealMode, reg, tk, shared.sealingOptions()...)
		}
		if err != nil {
			return err
		}
		opts = append(opts, rpc.WithSealing(sealer))
	}
	var builtins []builtin
	var ownTokenKey ed25519.PublicKey
	for _, name := range services {
		var b builtin
		var err error
		if name == "auth" {
			b, ownTokenKey, err = buildTokenService(tokFlags, svid.ID)
		} else {
			b, err = buildService(name, svcFlags, shared)
		}
		if err != nil {
			return err
		}
		builtins = append(builtins, b)
		opts = append(opts, b.opts...)
		for _, svc := range b.names {
			if err := policy.Allow("/"+svc+"/*", allow...); err != nil {
				return fmt.Errorf("%w: --allow: %v", errUsage, err)
			}
		}
	}
	tokenOpts, err := tokFlags.serverOptions(svid.ID, ownTokenKey)
	if err != nil {
		return err
	}
	opts = append(opts, tokenOpts...)
	srv, err := rpc.NewServer(src, opts...)
	if err != nil {
		return err
	}
	if wid.status != nil {
		if err := srv.WatchIdentity(ctx, wid.status, time.Second); err != nil {
			return err
		}
	}
	if err := shared.watch(ctx, srv); err != nil {
		return err
	}
	for _, b := range builtins {
		b.register(srv)
	}
	for _, r := range rules {
		if err := policy.Allow(r.Procedure, r.Allow...); err != nil {
			return fmt.Errorf("%w: config policy: %v", errUsage, err)
		}
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	// Logged once the socket is bound: readiness probes may wait for this line.
	logger.Info("veil serving", "addr", ln.Addr().String(), "id", svid.ID.String(), "services", services.String(),
		"pq", mode.String(), "pq_seal", sealMode, "require_token", *tokFlags.require, "allow", allow.String(), "cert_expires", svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
	if err := srv.Serve(ctx, ln); err != nil {
		return err
	}
	logger.Info("veil stopped")
	return nil
}

// validateServe checks what can be checked without an identity or the network: the
// services' names, the policy rules and patterns, the sealing mode and the state
// settings.
func validateServe(services, allow stringList, rules []policyRule, seal string, st stateFlags, svc serviceFlags) error {
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
	switch seal {
	case "", "strict", "permissive", "off":
	default:
		return fmt.Errorf("%w: --pq-seal %q: want strict, permissive or off", errUsage, seal)
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
