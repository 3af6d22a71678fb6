package rpc

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	"connectrpc.com/otelconnect"
	"connectrpc.com/validate"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/transport"
)

// DefaultReadLimit is the largest message a procedure accepts unless raised with
// WithReadLimit.
const DefaultReadLimit = 4 << 20

// DefaultGracePeriod is how long in-flight calls may run after shutdown starts.
const DefaultGracePeriod = 10 * time.Second

type serverConfig struct {
	pqMode       transport.PQMode
	policy       *Policy
	readLimits   map[string]int64
	compressed   map[string]bool
	metricsAddr  string
	registry     prometheus.Registerer
	otel         bool
	grace        time.Duration
	interceptors []connect.Interceptor
	middleware   []func(http.Handler) http.Handler
	logger       *slog.Logger
	sealing      *pqkex.Server
	noCoalesce   bool
	bootstrap    map[string]bool    // procedures reachable without a client certificate
	tokenAuth    []*tokenAuth       // WithBoundTokens' interceptors, which count refusals
	http3        *http3ServerConfig // WithHTTP3; nil: HTTP/2 over TCP only
}

// WithPolicy sets who may call what. Without it every application procedure is denied.
func WithPolicy(p *Policy) ServerOption { return serverOption(func(c *serverConfig) { c.policy = p }) }

// WithReadLimit raises (or lowers) the largest message procedure accepts, for example
// for bulk uploads. Larger messages fail with resource_exhausted.
func WithReadLimit(procedure string, bytes int64) ServerOption {
	return serverOption(func(c *serverConfig) { c.readLimits[procedure] = bytes })
}

// WithCompression lets procedure negotiate gzip. Veil servers do not compress by
// default: it costs CPU on small messages, gains nothing on encrypted payloads, and
// compressing before encrypting leaks through lengths. Opt in only for plaintext.
func WithCompression(procedure string) ServerOption {
	return serverOption(func(c *serverConfig) { c.compressed[procedure] = true })
}

// WithMetricsAddr serves Prometheus metrics on a separate plain-HTTP listener.
func WithMetricsAddr(addr string) ServerOption {
	return serverOption(func(c *serverConfig) { c.metricsAddr = addr })
}

// WithOpenTelemetry traces and measures calls with otelconnect and the global providers.
func WithOpenTelemetry() ServerOption { return serverOption(func(c *serverConfig) { c.otel = true }) }

// WithGracePeriod sets how long in-flight calls may finish after shutdown begins.
func WithGracePeriod(d time.Duration) ServerOption {
	return serverOption(func(c *serverConfig) { c.grace = d })
}

// WithInterceptors adds interceptors after Veil's own (metrics, authorization, validation).
func WithInterceptors(i ...connect.Interceptor) ServerOption {
	return serverOption(func(c *serverConfig) { c.interceptors = append(c.interceptors, i...) })
}

// WithMiddleware wraps the HTTP handler, innermost first, inside the peer middleware:
// a layer such as pqkex's sealing handler goes here.
func WithMiddleware(m func(http.Handler) http.Handler) ServerOption {
	return serverOption(func(c *serverConfig) { c.middleware = append(c.middleware, m) })
}

// WithLogger sets the server's logger (default slog.Default()).
func WithLogger(l *slog.Logger) ServerOption {
	return serverOption(func(c *serverConfig) { c.logger = l })
}

// healthAndReflection are the procedures every server mounts besides its services:
// any verified peer may call them, with no policy rule and no access token.
func healthAndReflection() map[string]bool {
	return map[string]bool{
		"/grpc.health.v1.Health/Check":                                   true,
		"/grpc.health.v1.Health/Watch":                                   true,
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      true,
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": true,
	}
}

// Server serves Connect, gRPC and gRPC-Web handlers over strict mutual TLS 1.3.
type Server struct {
	cfg      serverConfig
	source   transport.Source
	metrics  *Metrics
	health   *grpchealth.StaticChecker
	mux      *http.ServeMux
	services []string
	opts     []connect.HandlerOption

	mu       sync.Mutex
	http     *http.Server
	shutdown bool
	degraded map[string]bool // reasons the services are NOT_SERVING (setDegraded)
}

// NewServer returns a server that presents and verifies identities from src.
func NewServer(src transport.Source, opts ...ServerOption) (*Server, error) {
	cfg := serverConfig{
		readLimits: map[string]int64{},
		compressed: map[string]bool{},
		grace:      DefaultGracePeriod,
		logger:     slog.Default(),
	}
	for _, o := range opts {
		o.applyToServer(&cfg)
	}
	if cfg.registry == nil {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		cfg.registry = reg
	}
	if _, ok := cfg.registry.(prometheus.Gatherer); cfg.metricsAddr != "" && !ok {
		return nil, errors.New("rpc: WithMetricsAddr needs a WithMetrics registerer that is also a prometheus.Gatherer")
	}
	s := &Server{cfg: cfg, source: src, mux: http.NewServeMux(), health: grpchealth.NewStaticChecker()}
	s.metrics = newMetrics(cfg.registry, "server")
	for _, a := range cfg.tokenAuth {
		a.metrics = s.metrics
	}
	interceptors := []connect.Interceptor{
		s.metrics.interceptor(),
		(&authzInterceptor{policy: cfg.policy, bootstrap: cfg.bootstrap, public: healthAndReflection()}).interceptor(),
		validate.NewInterceptor(),
	}
	if cfg.otel {
		oi, err := otelconnect.NewInterceptor()
		if err != nil {
			return nil, fmt.Errorf("rpc: otel: %w", err)
		}
		interceptors = append(interceptors, oi)
	}
	interceptors = append(interceptors, cfg.interceptors...)
	s.opts = []connect.HandlerOption{
		connect.WithInterceptors(interceptors...),
		connect.WithRecover(func(ctx context.Context, spec connect.Spec, _ http.Header, p any) error {
			cfg.logger.ErrorContext(ctx, "rpc: handler panicked", "procedure", spec.Procedure, "panic", fmt.Sprint(p))
			return connect.NewError(connect.CodeInternal, errors.New("rpc: internal error"))
		}),
	}
	return s, nil
}

// Metrics returns the server's collectors (also a transport.Observer).
func (s *Server) Metrics() *Metrics { return s.metrics }

// Registerer returns where the server's metrics are registered (see WithMetrics), for
// services to add their own.
func (s *Server) Registerer() prometheus.Registerer { return s.cfg.registry }

// Health returns the server's health checker, to report a service degraded.
func (s *Server) Health() *grpchealth.StaticChecker { return s.health }

// handlerOptions returns the options for one procedure (or a whole service when
// procedure is its path prefix).
func (s *Server) handlerOptions(procedure string) []connect.HandlerOption {
	limit := int64(DefaultReadLimit)
	if l, ok := s.cfg.readLimits[procedure]; ok {
		limit = l
	}
	opts := append([]connect.HandlerOption{}, s.opts...)
	opts = append(opts, connect.WithReadMaxBytes(int(limit)))
	if !s.cfg.compressed[procedure] {
		opts = append(opts, connect.WithCompression("gzip", nil, nil))
	}
	return opts
}

// Register mounts the handlers of one generated service, e.g.
//
//	rpc.Register(srv, echov1connect.NewEchoServiceHandler, impl)
//
// Procedures with their own read limit or compression setting are mounted separately
// with those options; the rest share the defaults.
func Register[T any](s *Server, newHandler func(T, ...connect.HandlerOption) (string, http.Handler), impl T) {
	s.Handle(func(opts ...connect.HandlerOption) (string, http.Handler) { return newHandler(impl, opts...) })
}

// Handle mounts a service built by newHandler with Veil's handler options. Register is
// the typed form for generated constructors.
func (s *Server) Handle(newHandler func(...connect.HandlerOption) (string, http.Handler)) {
	path, h := newHandler(s.handlerOptions("")...)
	s.mux.Handle(path, h)
	service := strings.Trim(path, "/")
	s.services = append(s.services, service)
	s.health.SetStatus(service, grpchealth.StatusServing)
	overridden := map[string]bool{}
	for p := range s.cfg.readLimits {
		overridden[p] = true
	}
	for p := range s.cfg.compressed {
		overridden[p] = true
	}
	for p := range overridden {
		if strings.HasPrefix(p, path) {
			_, ph := newHandler(s.handlerOptions(p)...)
			s.mux.Handle(p, ph)
		}
	}
}

// Handler returns the server's HTTP handler with health and reflection mounted. It
// expects requests over a verified TLS connection (Serve provides one).
func (s *Server) Handler() http.Handler {
	s.mux.Handle(grpchealth.NewHandler(s.health, s.handlerOptions("")...))
	reflector := grpcreflect.NewStaticReflector(s.services...)
	s.mux.Handle(grpcreflect.NewHandlerV1(reflector, s.handlerOptions("")...))
	s.mux.Handle(grpcreflect.NewHandlerV1Alpha(reflector, s.handlerOptions("")...))
	var h http.Handler = s.mux
	for _, m := range s.cfg.middleware {
		h = m(h)
	}
	if s.cfg.sealing != nil {
		h = s.cfg.sealing.Handler(withSealedPeer(h))
	}
	return s.peerHandler(h)
}

// ListenAndServe listens on addr and serves until ctx is done, then shuts down
// gracefully (see Serve).
func (s *Server) ListenAndServe(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("rpc: %w", err)
	}
	return s.Serve(ctx, ln)
}

// Serve accepts connections on ln until ctx is done. Then it stops accepting, marks
// every service NOT_SERVING, lets in-flight calls finish for the grace period, and
// closes what remains. It returns nil after a clean shutdown.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	tlsCfg := transport.ServerConfig(s.source, append(s.bootstrapTLSOptions(), transport.WithPQMode(s.cfg.pqMode), transport.WithObserver(s.metrics))...)
	handler := s.Handler()
	var h3 *http3Server
	if s.cfg.http3 != nil {
		tm := newTransportMetrics(s.cfg.registry)
		var err error
		if h3, handler, err = s.startHTTP3(ln.Addr(), tlsCfg, tm.handler(handler), tm); err != nil {
			_ = ln.Close()
			return err
		}
	}
	hs := &http.Server{
		Handler:           handler,
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.New(handshakeLog{s.metrics}, "", 0),
	}
	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		h3.close()
		return errors.New("rpc: server already shut down")
	}
	s.http = hs
	s.mu.Unlock()

	var metricsSrv *http.Server
	if s.cfg.metricsAddr != "" {
		mln, err := net.Listen("tcp", s.cfg.metricsAddr)
		if err != nil {
			_ = ln.Close()
			h3.close()
			return fmt.Errorf("rpc: metrics listener: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(s.cfg.registry.(prometheus.Gatherer), promhttp.HandlerOpts{}))
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = metricsSrv.Serve(mln) }()
	}

	if !s.cfg.noCoalesce {
		ln = coalescingListener{ln}
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.ServeTLS(ln, "", "") }()
	select {
	case err := <-errc:
		if metricsSrv != nil {
			_ = metricsSrv.Close()
		}
		h3.close()
		return fmt.Errorf("rpc: %w", err)
	case <-ctx.Done():
	}
	s.mu.Lock()
	s.shutdown = true
	s.mu.Unlock()
	for _, svc := range s.services {
		s.health.SetStatus(svc, grpchealth.StatusNotServing)
	}
	s.health.SetStatus("", grpchealth.StatusNotServing)
	graceCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.grace)
	defer cancel()
	var h3err error
	h3done := make(chan struct{})
	go func() {
		defer close(h3done)
		if h3 != nil {
			h3err = h3.shutdown(graceCtx)
		}
	}()
	err := hs.Shutdown(graceCtx)
	if err != nil {
		_ = hs.Close()
	}
	<-h3done
	err = errors.Join(err, h3err)
	if metricsSrv != nil {
		_ = metricsSrv.Close()
	}
	if serveErr := <-errc; serveErr != nil && !errors.Is(serveErr, http.ErrServerClosed) {
		s.cfg.logger.Warn("rpc: serve ended with an error during shutdown", "err", serveErr)
	}
	if err != nil {
		return fmt.Errorf("rpc: shutdown: in-flight calls outlasted the %s grace period: %w", s.cfg.grace, err)
	}
	return nil
}
