// Package ca is Veil's online certificate authority, served over Veil itself: workloads
// join with a single-use token, renew with their current certificate for the same
// SPIFFE ID only, and fetch the trust bundle and denylist. It keeps its state in a
// pki.CA directory, so a restarted CA continues where it stopped. See docs/ca.md.
package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	cav1 "github.com/veilrpc/veil/gen/veil/ca/v1"
	"github.com/veilrpc/veil/gen/veil/ca/v1/cav1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
)

// DefaultMaxTTL is the longest leaf the online CA issues unless configured otherwise.
const DefaultMaxTTL = 24 * time.Hour

// Option configures New. Options are values with an unexported method, as in
// connect-go and packages transport and rpc.
type Option interface {
	applyToService(*config)
}

type option func(*config)

func (f option) applyToService(c *config) { f(c) }

type config struct {
	maxTTL     time.Duration
	defaultTTL time.Duration
	rate       float64
	burst      int
	logger     *slog.Logger
	now        func() time.Time
	registerer prometheus.Registerer
}

// WithMaxTTL sets the longest lifetime the CA issues (default DefaultMaxTTL).
// Longer requests are refused with invalid_argument.
func WithMaxTTL(d time.Duration) Option { return option(func(c *config) { c.maxTTL = d }) }

// WithDefaultTTL sets the lifetime of requests that ask for none (default: the max TTL).
func WithDefaultTTL(d time.Duration) Option { return option(func(c *config) { c.defaultTTL = d }) }

// WithRateLimit sets the per-identity issuance rate: perSecond sustained, burst at once
// (default 0.2/s, burst 5). Over it, requests fail with resource_exhausted.
func WithRateLimit(perSecond float64, burst int) Option {
	return option(func(c *config) { c.rate, c.burst = perSecond, burst })
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return option(func(c *config) { c.logger = l }) }

// WithMetrics registers veil_ca_requests_total{procedure,result} in reg, for a Service
// mounted on a server of the caller's. The default is none; NewServer registers it in
// its rpc.Server's registry (rpc.WithMetrics) in any case.
func WithMetrics(reg prometheus.Registerer) Option {
	return option(func(c *config) { c.registerer = reg })
}

// WithClock sets the clock (tests).
func WithClock(now func() time.Time) Option { return option(func(c *config) { c.now = now }) }

// Service implements cav1connect.CAServiceHandler over a CA directory. Changes other
// processes make to the directory (new tokens, rotation steps, revocations) take effect
// on the next request.
type Service struct {
	dir     string
	cfg     config
	limiter *limiter
	results *prometheus.CounterVec

	mu sync.Mutex
	ca *pki.CA
}

var _ cav1connect.CAServiceHandler = (*Service)(nil)

// New opens the CA in dir.
func New(dir string, opts ...Option) (*Service, error) {
	cfg := config{maxTTL: DefaultMaxTTL, rate: 0.2, burst: 5, logger: slog.Default(), now: time.Now}
	for _, o := range opts {
		o.applyToService(&cfg)
	}
	if cfg.defaultTTL == 0 {
		cfg.defaultTTL = cfg.maxTTL
	}
	if cfg.maxTTL <= 0 || cfg.maxTTL > pki.MaxLeafTTL || cfg.defaultTTL > cfg.maxTTL || cfg.rate <= 0 || cfg.burst < 1 {
		return nil, errors.New("ca: bad TTL or rate limit settings")
	}
	c, err := pki.LoadCA(dir)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	s := &Service{
		dir: dir, cfg: cfg, ca: c,
		limiter: newLimiter(cfg.rate, cfg.burst),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "veil_ca_requests_total", Help: "CA requests by procedure and result (issued, or the refusal reason).",
		}, []string{"procedure", "result"}),
	}
	if cfg.registerer != nil {
		if err := s.register(cfg.registerer); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// register registers the service's metrics in reg; registering them twice in one
// registry is not an error.
func (s *Service) register(reg prometheus.Registerer) error {
	err := reg.Register(s.results)
	var dup prometheus.AlreadyRegisteredError
	if errors.As(err, &dup) && dup.ExistingCollector == s.results {
		return nil
	}
	if err != nil {
		return fmt.Errorf("ca: metrics: %w", err)
	}
	return nil
}

// CA returns the current CA, reloading it if another process changed its files.
func (s *Service) CA() (*pki.CA, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ca.Stale() {
		c, err := pki.LoadCA(s.dir)
		if err != nil {
			return nil, fmt.Errorf("ca: reloading: %w", err)
		}
		s.ca = c
	}
	return s.ca, nil
}

// Join issues a first certificate against a join token.
func (s *Service) Join(ctx context.Context, req *connect.Request[cav1.JoinRequest]) (*connect.Response[cav1.JoinResponse], error) {
	issued, r := s.join(ctx, req.Msg)
	if r != nil {
		return nil, s.refused(ctx, cav1connect.CAServiceJoinProcedure, r)
	}
	s.results.WithLabelValues(cav1connect.CAServiceJoinProcedure, "issued").Inc()
	return connect.NewResponse(&cav1.JoinResponse{Issued: issued}), nil
}

func (s *Service) join(_ context.Context, m *cav1.JoinRequest) (*cav1.Issued, *refusal) {
	c, err := s.CA()
	if err != nil {
		return nil, refuse(reasonInternal, "ca: unavailable")
	}
	csr, id, r := parseCSR(m.GetCsr(), c.TrustDomain())
	if r != nil {
		return nil, r
	}
	ttl, r := s.ttl(m.GetTtlSeconds())
	if r != nil {
		return nil, r
	}
	if _, r := (pqRequest{m.GetPqStaticKey(), m.GetPqSuite()}).suite(); r != nil {
		return nil, r
	}
	pattern, r := useToken(s.dir, m.GetToken(), s.cfg.now())
	if r != nil {
		return nil, r
	}
	if !pattern.Match(id) {
		return nil, refuse(reasonEscalation, "ca: the join token does not grant %s", id)
	}
	return s.issue(c, id, csr, ttl, pqRequest{m.GetPqStaticKey(), m.GetPqSuite()})
}

// Renew issues a new certificate for the caller's own SPIFFE ID.
func (s *Service) Renew(ctx context.Context, req *connect.Request[cav1.RenewRequest]) (*connect.Response[cav1.RenewResponse], error) {
	issued, r := s.renew(ctx, req.Msg)
	if r != nil {
		return nil, s.refused(ctx, cav1connect.CAServiceRenewProcedure, r)
	}
	s.results.WithLabelValues(cav1connect.CAServiceRenewProcedure, "issued").Inc()
	return connect.NewResponse(&cav1.RenewResponse{Issued: issued}), nil
}

func (s *Service) renew(ctx context.Context, m *cav1.RenewRequest) (*cav1.Issued, *refusal) {
	chain := peerChain(ctx)
	peer, ok := rpc.PeerFromContext(ctx)
	if !ok || len(chain) == 0 {
		return nil, refuse(reasonUnauthenticate, "ca: renewal needs the caller's current certificate")
	}
	c, err := s.CA()
	if err != nil {
		return nil, refuse(reasonInternal, "ca: unavailable")
	}
	// The TLS handshake verified the chain; a connection may outlive its certificate or
	// a revocation, so both are checked again on every renewal.
	if !s.cfg.now().Before(chain[0].NotAfter) {
		return nil, refuse(reasonExpiredCert, "ca: the caller's certificate expired at %s", chain[0].NotAfter.UTC().Format(time.RFC3339))
	}
	if err := c.Denylist().Check(chain); err != nil {
		return nil, refuse(reasonRevoked, "ca: %v", err)
	}
	csr, id, r := parseCSR(m.GetCsr(), c.TrustDomain())
	if r != nil {
		return nil, r
	}
	if id != peer.ID {
		return nil, refuse(reasonEscalation, "ca: %s may renew only its own ID, not %s", peer.ID, id)
	}
	ttl, r := s.ttl(m.GetTtlSeconds())
	if r != nil {
		return nil, r
	}
	return s.issue(c, id, csr, ttl, pqRequest{m.GetPqStaticKey(), m.GetPqSuite()})
}

// GetBundle returns the roots and the denylist.
func (s *Service) GetBundle(ctx context.Context, _ *connect.Request[cav1.GetBundleRequest]) (*connect.Response[cav1.GetBundleResponse], error) {
	c, err := s.CA()
	if err != nil {
		return nil, s.refused(ctx, cav1connect.CAServiceGetBundleProcedure, refuse(reasonInternal, "ca: unavailable"))
	}
	s.results.WithLabelValues(cav1connect.CAServiceGetBundleProcedure, "ok").Inc()
	return connect.NewResponse(&cav1.GetBundleResponse{Bundle: bundleOf(c)}), nil
}

func (s *Service) ttl(seconds uint32) (time.Duration, *refusal) {
	if seconds == 0 {
		return s.cfg.defaultTTL, nil
	}
	ttl := time.Duration(seconds) * time.Second
	if ttl > s.cfg.maxTTL {
		return 0, refuse(reasonBadTTL, "ca: TTL %s exceeds the maximum %s", ttl, s.cfg.maxTTL)
	}
	return ttl, nil
}

// pqRequest is an optional pqkex static key to certify with the certificate.
type pqRequest struct {
	key  []byte
	name string
}

func (p pqRequest) suite() (pqkex.Scheme, *refusal) {
	if len(p.key) == 0 {
		return nil, nil
	}
	name := p.name
	if name == "" {
		name = pqkex.X25519MLKEM768().Name()
	}
	suite := pqkex.SchemeByName(name)
	if suite == nil {
		return nil, refuse(reasonBadPQKey, "ca: unknown pqkex suite %q", name)
	}
	if _, err := suite.UnmarshalBinaryPublicKey(p.key); err != nil {
		return nil, refuse(reasonBadPQKey, "ca: the static key is not a %s public key", name)
	}
	return suite, nil
}

func (s *Service) issue(c *pki.CA, id spiffeid.ID, csr *x509.CertificateRequest, ttl time.Duration, pq pqRequest) (*cav1.Issued, *refusal) {
	suite, r := pq.suite()
	if r != nil {
		return nil, r
	}
	if slices.Contains(c.Denylist().IDs(), id.String()) {
		return nil, refuse(reasonRevoked, "ca: %s is revoked", id)
	}
	if !s.limiter.allow(id.String(), s.cfg.now()) {
		return nil, refuse(reasonRateLimited, "ca: too many certificates for %s; retry later", id)
	}
	chain, err := c.Issue(id, csr.PublicKey, ttl)
	if err != nil {
		s.cfg.logger.Error("ca: issuing failed", "id", id.String(), "err", err.Error())
		return nil, refuse(reasonInternal, "ca: issuing failed")
	}
	out := &cav1.Issued{Bundle: bundleOf(c)}
	for _, cert := range chain {
		out.Chain = append(out.Chain, cert.Raw)
	}
	if suite != nil {
		// The credential shares the certificate's ID and validity, and is signed by
		// both CA keys (ML-DSA-65 and the signing root).
		// ShangMi credentials are signed with the CA's SM2 key instead (docs/pqkex.md 3.1).
		classical := c.Signer()
		if suite.ID() == pqkex.SM2MLKEM768().ID() {
			if classical = c.SM2Signer(); classical == nil {
				return nil, refuse(reasonBadPQKey, "ca: this CA has no SM2 key for ShangMi credentials")
			}
		}
		cred, err := pqkex.IssueCredential(c.PQSigner(), classical, suite, id.String(), chain[0].NotBefore, chain[0].NotAfter, pq.key)
		if err != nil {
			return nil, refuse(reasonBadPQKey, "ca: %v", err)
		}
		out.PqCredential, out.PqRoot, out.PqSm2Root = cred, c.PQPublicKey().Bytes(), c.SM2PublicKeyBytes()
	}
	s.cfg.logger.Info("ca: issued", "id", id.String(), "serial", chain[0].SerialNumber.Text(16), "not_after", chain[0].NotAfter.UTC().Format(time.RFC3339))
	return out, nil
}

func (s *Service) refused(ctx context.Context, procedure string, r *refusal) error {
	s.results.WithLabelValues(procedure, r.reason).Inc()
	s.cfg.logger.WarnContext(ctx, "ca: refused", "procedure", procedure, "reason", r.reason, "err", r.err.Error())
	return r.connectError()
}

func bundleOf(c *pki.CA) *cav1.Bundle {
	b := &cav1.Bundle{
		TrustDomain:   c.TrustDomain().Name(),
		DeniedSerials: c.Denylist().Serials(),
		DeniedIds:     c.Denylist().IDs(),
		Sequence:      c.Sequence(),
	}
	for _, r := range c.Bundle() {
		b.Roots = append(b.Roots, r.Raw)
	}
	return b
}

// limiter is a token bucket per identity.
type limiter struct {
	rate  float64
	burst int
	mu    sync.Mutex
	b     map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newLimiter(rate float64, burst int) *limiter {
	return &limiter{rate: rate, burst: burst, b: map[string]*bucket{}}
}

func (l *limiter) allow(key string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.b[key]
	if !ok {
		if len(l.b) > 100_000 { // bound memory: forget full buckets
			for k, v := range l.b {
				if v.tokens+now.Sub(v.last).Seconds()*l.rate >= float64(l.burst) {
					delete(l.b, k)
				}
			}
		}
		b = &bucket{tokens: float64(l.burst), last: now}
		l.b[key] = b
	}
	b.tokens = min(float64(l.burst), b.tokens+now.Sub(b.last).Seconds()*l.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

type chainKey struct{}

// withPeerChain keeps the caller's verified certificate chain in the request context,
// for checks that need more than its SPIFFE ID (serial, expiry).
func withPeerChain(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			r = r.WithContext(context.WithValue(r.Context(), chainKey{}, r.TLS.PeerCertificates))
		}
		next.ServeHTTP(w, r)
	})
}

func peerChain(ctx context.Context) []*x509.Certificate {
	c, _ := ctx.Value(chainKey{}).([]*x509.Certificate)
	return c
}
