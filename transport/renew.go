package transport

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	neturl "net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Trust is the trust material a CA hands out: its roots and its denylist.
type Trust struct {
	TrustDomain spiffeid.TrustDomain
	Roots       []*x509.Certificate
	Denylist    Denylist // nil denies nothing
}

// Issued is a certificate chain (leaf first) with the trust material of its CA.
type Issued struct {
	Chain []*x509.Certificate
	Trust Trust
}

// Issuer obtains certificates for a RenewingSource: the client side of a CA such as
// `veil ca serve` (package services/ca implements it). csr is a DER PKCS#10 request.
type Issuer interface {
	// Join obtains the first certificate, authorized by something other than a
	// certificate (for Veil's CA, a join token).
	Join(ctx context.Context, csr []byte, ttl time.Duration) (*Issued, error)
	// Renew obtains a new certificate for the same ID, authorized by the current one,
	// which current (the RenewingSource itself) presents.
	Renew(ctx context.Context, current Source, csr []byte, ttl time.Duration) (*Issued, error)
	// Trust fetches the current roots and denylist, as current.
	Trust(ctx context.Context, current Source) (*Trust, error)
}

// RenewOption configures NewRenewingSource.
type RenewOption interface {
	applyToRenew(*renewConfig)
}

// SourceOption configures both sources that keep themselves current in the
// background, NewRenewingSource and WatchFiles.
type SourceOption interface {
	RenewOption
	WatchOption
}

type renewOption func(*renewConfig)

func (f renewOption) applyToRenew(c *renewConfig) { f(c) }

type loggerOption struct{ l *slog.Logger }

func (o loggerOption) applyToRenew(c *renewConfig) { c.logger = o.l }
func (o loggerOption) applyToWatch(c *watchConfig) { c.logger = o.l }

// WithLogger logs what a background source does: renewals, reloads, and the failures
// and rejected files it keeps serving through (default slog.Default()).
func WithLogger(l *slog.Logger) SourceOption { return loggerOption{l} }

type renewConfig struct {
	ttl          time.Duration
	fraction     float64
	renewBefore  time.Duration
	degradeBelow time.Duration
	trustEvery   time.Duration
	minBackoff   time.Duration
	maxBackoff   time.Duration
	logger       *slog.Logger
	now          func() time.Time
}

// WithCertTTL sets the lifetime to request (default 24 hours; the CA may cap it).
func WithCertTTL(d time.Duration) RenewOption { return renewOption(func(c *renewConfig) { c.ttl = d }) }

// WithRenewAt renews once this fraction of the lifetime has passed (default 2/3, as
// step-ca does).
func WithRenewAt(fraction float64) RenewOption {
	return renewOption(func(c *renewConfig) { c.fraction = fraction })
}

// WithRenewBefore renews a fixed margin before expiry instead (cert-manager's renewBefore).
func WithRenewBefore(d time.Duration) RenewOption {
	return renewOption(func(c *renewConfig) { c.renewBefore = d })
}

// WithDegradeBelow sets the remaining lifetime under which Status reports the source
// unhealthy (default: a sixth of the lifetime, half the window left for retries).
func WithDegradeBelow(d time.Duration) RenewOption {
	return renewOption(func(c *renewConfig) { c.degradeBelow = d })
}

// WithTrustRefresh fetches roots and denylist this often between renewals (default one
// minute, or a third of the lifetime if shorter), so that a new root or a revocation
// reaches workloads quickly.
func WithTrustRefresh(d time.Duration) RenewOption {
	return renewOption(func(c *renewConfig) { c.trustEvery = d })
}

// WithRetryBackoff bounds the jittered exponential backoff between failed attempts
// (default 1 s to 1 min, never more than a tenth of the lifetime).
func WithRetryBackoff(minimum, maximum time.Duration) RenewOption {
	return renewOption(func(c *renewConfig) { c.minBackoff, c.maxBackoff = minimum, maximum })
}

// RenewingSource is a Source whose certificate comes from an Issuer: it joins once,
// then renews ahead of expiry in the background. While the CA is unreachable it retries
// with jittered exponential backoff and keeps serving the current certificate; Status
// turns unhealthy before that certificate expires. Roots and denylist are refreshed
// with every renewal and in between. Make one with NewRenewingSource (the zero value is
// not usable).
type RenewingSource struct {
	issuer Issuer
	id     spiffeid.ID
	cfg    renewConfig
	cur    atomic.Pointer[renewState]

	mu        sync.Mutex
	renewals  uint64
	failures  uint64
	lastErr   string
	nextRenew time.Time

	stop context.CancelFunc
	done chan struct{}
}

type renewState struct {
	svid     *x509svid.SVID
	bundles  *x509bundle.Set
	denylist Denylist
	issuedAt time.Time
	roots    []*x509.Certificate
}

// NewRenewingSource joins through issuer as id and starts renewing in the background
// until ctx ends or Close is called. It fails if the first certificate cannot be had.
func NewRenewingSource(ctx context.Context, issuer Issuer, id spiffeid.ID, opts ...RenewOption) (*RenewingSource, error) {
	cfg := renewConfig{ttl: 24 * time.Hour, fraction: 2.0 / 3, minBackoff: time.Second, maxBackoff: time.Minute,
		trustEvery: time.Minute, logger: slog.Default(), now: time.Now}
	for _, o := range opts {
		o.applyToRenew(&cfg)
	}
	switch {
	case cfg.ttl <= 0:
		return nil, errors.New("transport: certificate TTL must be positive")
	case cfg.fraction <= 0 || cfg.fraction >= 1:
		return nil, fmt.Errorf("transport: renewal point %v must be between 0 and 1", cfg.fraction)
	case cfg.renewBefore < 0 || cfg.renewBefore >= cfg.ttl:
		return nil, fmt.Errorf("transport: renew-before %s must be shorter than the TTL %s", cfg.renewBefore, cfg.ttl)
	case cfg.minBackoff <= 0 || cfg.maxBackoff < cfg.minBackoff:
		return nil, errors.New("transport: bad retry backoff")
	}
	s := &RenewingSource{issuer: issuer, id: id, cfg: cfg, done: make(chan struct{})}
	key, csr, err := NewCSR(id)
	if err != nil {
		return nil, err
	}
	issued, err := issuer.Join(ctx, csr, cfg.ttl)
	if err != nil {
		return nil, fmt.Errorf("transport: join as %s: %w", id, err)
	}
	if err := s.install(issued, key); err != nil {
		return nil, err
	}
	s.nextRenew = s.renewAt(s.cur.Load())
	loopCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.stop = cancel
	go func() {
		select {
		case <-ctx.Done():
			cancel()
		case <-loopCtx.Done():
		}
	}()
	go s.loop(loopCtx)
	return s, nil
}

// NewCSR generates a P-256 key and a PKCS#10 request for id (its only SAN).
func NewCSR(id spiffeid.ID) (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("transport: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*neturl.URL{id.URL()}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("transport: CSR: %w", err)
	}
	return key, csr, nil
}

// install checks an issued chain against the key and the trust material that came
// with it, and makes it current.
func (s *RenewingSource) install(issued *Issued, key *ecdsa.PrivateKey) error {
	if issued == nil || len(issued.Chain) == 0 {
		return errors.New("transport: the CA returned no certificate")
	}
	leaf := issued.Chain[0]
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return errors.New("transport: the CA returned a certificate for another key")
	}
	svid := &x509svid.SVID{ID: s.id, Certificates: issued.Chain, PrivateKey: key}
	got, err := x509svid.IDFromCert(leaf)
	if err != nil || got != s.id {
		return fmt.Errorf("transport: the CA returned a certificate for %v, not %s", got, s.id)
	}
	bundle := x509bundle.FromX509Authorities(issued.Trust.TrustDomain, issued.Trust.Roots)
	if _, _, err := x509svid.Verify(issued.Chain, bundle, x509svid.WithTime(s.cfg.now())); err != nil {
		return fmt.Errorf("transport: the issued certificate does not verify: %w", err)
	}
	s.cur.Store(&renewState{svid: svid, bundles: x509bundle.NewSet(bundle), denylist: issued.Trust.Denylist,
		issuedAt: s.cfg.now(), roots: issued.Trust.Roots})
	return nil
}

func (s *RenewingSource) setTrust(t *Trust) error {
	old := s.cur.Load()
	bundle := x509bundle.FromX509Authorities(t.TrustDomain, t.Roots)
	if _, _, err := x509svid.Verify(old.svid.Certificates, bundle, x509svid.WithTime(s.cfg.now())); err != nil {
		// Trusting roots our own certificate does not chain to would lock us out;
		// wait for the renewal that brings a certificate from the new root.
		return fmt.Errorf("transport: new trust bundle does not cover the current certificate: %w", err)
	}
	n := *old
	n.bundles, n.denylist, n.roots = x509bundle.NewSet(bundle), t.Denylist, t.Roots
	s.cur.Store(&n)
	return nil
}

// renewAt is when the current certificate should be renewed.
func (s *RenewingSource) renewAt(st *renewState) time.Time {
	notAfter := st.svid.Certificates[0].NotAfter
	life := notAfter.Sub(st.issuedAt)
	if s.cfg.renewBefore > 0 {
		at := notAfter.Add(-s.cfg.renewBefore)
		if at.Before(st.issuedAt) {
			at = st.issuedAt.Add(life / 2)
		}
		return at
	}
	return st.issuedAt.Add(time.Duration(float64(life) * s.cfg.fraction))
}

func (s *RenewingSource) loop(ctx context.Context) {
	defer close(s.done)
	backoff := time.Duration(0)
	nextTrust := s.cfg.now().Add(s.trustEvery())
	for {
		st := s.cur.Load()
		next := s.renewAt(st)
		if backoff > 0 {
			// A retry always comes before expiry: after an attempt that waited long on a
			// slow CA (renew), the backoff alone could land past NotAfter.
			now := s.cfg.now()
			next = now.Add(retryWait(jitter(backoff), st.svid.Certificates[0].NotAfter.Sub(now)))
		}
		s.mu.Lock()
		s.nextRenew = next
		s.mu.Unlock()
		wake, isTrust := next, false
		if nextTrust.Before(next) {
			wake, isTrust = nextTrust, true
		}
		t := time.NewTimer(max(wake.Sub(s.cfg.now()), 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if isTrust {
			nextTrust = s.cfg.now().Add(s.trustEvery())
			if err := s.refreshTrust(ctx); err != nil {
				s.cfg.logger.Warn("transport: trust bundle refresh failed", "id", s.id.String(), "err", err.Error())
			}
			continue
		}
		if err := s.renew(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			life := st.svid.Certificates[0].NotAfter.Sub(st.issuedAt)
			backoff = min(max(2*backoff, s.cfg.minBackoff), s.cfg.maxBackoff, max(life/10, time.Millisecond))
			s.mu.Lock()
			s.failures++
			s.lastErr = err.Error()
			s.mu.Unlock()
			s.cfg.logger.Warn("transport: certificate renewal failed; serving with the current certificate",
				"id", s.id.String(), "expires", st.svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339), "retry_in", backoff.String(), "err", err.Error())
			continue
		}
		backoff = 0
		nextTrust = s.cfg.now().Add(s.trustEvery())
	}
}

func (s *RenewingSource) trustEvery() time.Duration {
	if s.cfg.trustEvery <= 0 {
		return s.cfg.ttl
	}
	return min(s.cfg.trustEvery, max(s.cfg.ttl/3, time.Millisecond))
}

func (s *RenewingSource) renew(ctx context.Context) error {
	key, csr, err := NewCSR(s.id)
	if err != nil {
		return err
	}
	st := s.cur.Load()
	rctx, cancel := context.WithTimeout(ctx, attemptTimeout(st.svid.Certificates[0].NotAfter.Sub(s.cfg.now())))
	defer cancel()
	issued, err := s.issuer.Renew(rctx, s, csr, s.cfg.ttl)
	if err != nil {
		return err
	}
	if err := s.install(issued, key); err != nil {
		return err
	}
	s.mu.Lock()
	s.renewals++
	s.lastErr = ""
	s.mu.Unlock()
	s.cfg.logger.Debug("transport: certificate renewed", "id", s.id.String(), "serial", issued.Chain[0].SerialNumber.Text(16),
		"expires", issued.Chain[0].NotAfter.UTC().Format(time.RFC3339))
	return nil
}

func (s *RenewingSource) refreshTrust(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	t, err := s.issuer.Trust(rctx, s)
	if err != nil {
		return err
	}
	return s.setTrust(t)
}

// attemptTimeout bounds one renewal attempt with left of the certificate's life to go:
// it may run until an eighth of that is left (at most 30 s, at least 1 s). On an
// overloaded CA or host, giving up early throws away the answer that is on its way, and
// every retry would give up sooner.
func attemptTimeout(left time.Duration) time.Duration {
	return min(30*time.Second, max(left-left/8, time.Second))
}

// retryWait is how long to wait before retrying a failed renewal: the jittered backoff,
// but never more than a quarter of the life left, so that a retry always comes before
// expiry (after an attempt that used most of the life left, the backoff alone could land
// past NotAfter, and an expired certificate cannot renew).
func retryWait(backoff, left time.Duration) time.Duration {
	if left > 0 {
		return min(backoff, left/4)
	}
	return backoff
}

// jitter spreads d over [d/2, 3d/2) so that workloads do not retry in step.
func jitter(d time.Duration) time.Duration {
	return d/2 + time.Duration(mrand.Int64N(int64(d)+1))
}

// Close stops renewing. The current certificate stays available.
func (s *RenewingSource) Close() error {
	s.stop()
	<-s.done
	return nil
}

// GetX509SVID returns the current certificate.
func (s *RenewingSource) GetX509SVID() (*x509svid.SVID, error) { return s.cur.Load().svid, nil }

// GetX509BundleForTrustDomain returns the current roots for td.
func (s *RenewingSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.cur.Load().bundles.GetX509BundleForTrustDomain(td)
}

// GetDenylist returns the denylist that came with the current trust bundle.
func (s *RenewingSource) GetDenylist() Denylist { return s.cur.Load().denylist }

// RenewStatus is a RenewingSource's state, for health checks and metrics.
type RenewStatus struct {
	ID          spiffeid.ID
	Serial      string
	NotAfter    time.Time
	Remaining   time.Duration
	NextRenewal time.Time
	Renewals    uint64 // successful renewals
	Failures    uint64 // failed attempts
	LastError   string // of the latest attempt, "" after a success
	Roots       int
	// Healthy is false once the remaining lifetime falls under the degrade threshold:
	// renewal has been failing for a while and the certificate will expire.
	Healthy bool
}

// Status reports the source's state.
func (s *RenewingSource) Status() RenewStatus {
	st := s.cur.Load()
	leaf := st.svid.Certificates[0]
	now := s.cfg.now()
	degrade := s.cfg.degradeBelow
	if degrade <= 0 {
		degrade = leaf.NotAfter.Sub(st.issuedAt) / 6
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return RenewStatus{
		ID: s.id, Serial: leaf.SerialNumber.Text(16), NotAfter: leaf.NotAfter, Remaining: leaf.NotAfter.Sub(now),
		NextRenewal: s.nextRenew, Renewals: s.renewals, Failures: s.failures, LastError: s.lastErr,
		Roots: len(st.roots), Healthy: leaf.NotAfter.Sub(now) > degrade,
	}
}
