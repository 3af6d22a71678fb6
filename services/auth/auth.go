// Package auth is Veil's token service (veil.auth.v1): it issues short-lived access
// tokens (JWT, EdDSA) to callers authenticated by mutual TLS, bound to the caller's
// client certificate (RFC 8705 x5t#S256) and to one audience, the target service's
// SPIFFE ID. Servers check them on every call with rpc.WithBoundTokens; clients attach
// and refresh them with rpc.WithAccessTokens and a TokenSource.
package auth

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	authv1 "github.com/veilrpc/veil/gen/veil/auth/v1"
	"github.com/veilrpc/veil/gen/veil/auth/v1/authv1connect"
	"github.com/veilrpc/veil/internal/atomicfile"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// DefaultTokenTTL is the lifetime of an access token.
const DefaultTokenTTL = 5 * time.Minute

// Service implements authv1connect.TokenServiceHandler. Mount it on a server built
// with rpc.WithPeerCertificates, so that it sees the certificate to bind to.
type Service struct {
	issuer string
	key    ed25519.PrivateKey
	ttl    time.Duration
	now    func() time.Time
	issued atomic.Int64
}

var _ authv1connect.TokenServiceHandler = (*Service)(nil)

// ServiceOption configures New.
type ServiceOption interface{ applyToService(*serviceConfig) }

// TokenSourceOption configures NewTokenSource.
type TokenSourceOption interface{ applyToTokenSource(*tokenSourceConfig) }

// Option is both a ServiceOption and a TokenSourceOption: it means the same on either
// side. Options are values with an unexported method, as in connect-go and package rpc.
type Option interface {
	ServiceOption
	TokenSourceOption
}

type serviceConfig struct {
	now func() time.Time
}

type tokenSourceConfig struct {
	now    func() time.Time
	hcOpts []rpc.ClientOption
}

type tokenSourceOption func(*tokenSourceConfig)

func (f tokenSourceOption) applyToTokenSource(c *tokenSourceConfig) { f(c) }

type option struct {
	service     func(*serviceConfig)
	tokenSource func(*tokenSourceConfig)
}

func (o option) applyToService(c *serviceConfig)         { o.service(c) }
func (o option) applyToTokenSource(c *tokenSourceConfig) { o.tokenSource(c) }

// WithClock sets the clock (default time.Now): the one the service stamps tokens with,
// or the one a TokenSource judges expiry by.
func WithClock(now func() time.Time) Option {
	return option{
		service:     func(c *serviceConfig) { c.now = now },
		tokenSource: func(c *tokenSourceConfig) { c.now = now },
	}
}

// WithClientOptions configures the HTTP clients that reach the token service, for
// example with rpc.WithClientSealing when it is served sealing-strict.
func WithClientOptions(opts ...rpc.ClientOption) TokenSourceOption {
	return tokenSourceOption(func(c *tokenSourceConfig) { c.hcOpts = append(c.hcOpts, opts...) })
}

// New returns a token service that signs as issuer (its own SPIFFE ID) with key, for
// tokens that live ttl (DefaultTokenTTL if zero).
func New(issuer spiffeid.ID, key ed25519.PrivateKey, ttl time.Duration, opts ...ServiceOption) *Service {
	if ttl <= 0 {
		ttl = DefaultTokenTTL
	}
	cfg := serviceConfig{now: time.Now}
	for _, o := range opts {
		o.applyToService(&cfg)
	}
	if cfg.now == nil {
		cfg.now = time.Now
	}
	return &Service{issuer: issuer.String(), key: key, ttl: ttl, now: cfg.now}
}

// IssueToken returns a token for the caller, bound to this connection's certificate.
func (s *Service) IssueToken(ctx context.Context, req *connect.Request[authv1.IssueTokenRequest]) (*connect.Response[authv1.IssueTokenResponse], error) {
	peer, ok := rpc.PeerFromContext(ctx)
	cert, ok2 := rpc.PeerCertificate(ctx)
	if !ok || !ok2 {
		return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("auth: no client certificate to bind the token to"))
	}
	aud, err := spiffeid.FromString(req.Msg.GetAudience())
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("auth: audience: %v", err))
	}
	now := s.now()
	exp := now.Add(s.ttl)
	if exp.After(cert.NotAfter) {
		exp = cert.NotAfter // a token never outlives the certificate it is bound to
	}
	jti := make([]byte, 16)
	if _, err := rand.Read(jti); err != nil {
		return nil, connect.NewError(connect.CodeInternal, errors.New("auth: internal error"))
	}
	claims := rpc.TokenClaims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer: s.issuer, Subject: peer.ID.String(), Audience: jwt.ClaimStrings{aud.String()},
			IssuedAt: jwt.NewNumericDate(now), NotBefore: jwt.NewNumericDate(now.Add(-30 * time.Second)),
			ExpiresAt: jwt.NewNumericDate(exp), ID: base64.RawURLEncoding.EncodeToString(jti),
		},
		Cnf: rpc.Confirmation{X5tS256: rpc.CertThumbprint(cert)},
	}
	tok, err := jwt.NewWithClaims(jwt.SigningMethodEdDSA, claims).SignedString(s.key)
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, errors.New("auth: signing failed"))
	}
	s.issued.Add(1)
	return connect.NewResponse(&authv1.IssueTokenResponse{Token: tok, ExpiresUnix: exp.Unix()}), nil
}

// Issued is the number of tokens the service has issued.
func (s *Service) Issued() int64 { return s.issued.Load() }

// TTL is the lifetime of the tokens the service issues.
func (s *Service) TTL() time.Duration { return s.ttl }

// PublicKeyFile is where LoadOrCreateKey writes the public key of the signing key at
// keyFile: keyFile + ".pub". Servers verify tokens with it (LoadPublicKey).
func PublicKeyFile(keyFile string) string { return keyFile + ".pub" }

// LoadOrCreateKey reads the Ed25519 signing key at path (PKCS#8 PEM), creating it
// (0600, atomically) if it does not exist, with its public key (PKIX PEM, 0644) at
// PublicKeyFile(path). Both are the formats of `openssl genpkey -algorithm ed25519`
// and `openssl pkey -pubout`.
func LoadOrCreateKey(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("auth: %w", err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, fmt.Errorf("auth: %w", err)
		}
		pub, err := x509.MarshalPKIXPublicKey(key.Public())
		if err != nil {
			return nil, fmt.Errorf("auth: %w", err)
		}
		if err := atomicfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, fmt.Errorf("auth: %w", err)
		}
		if err := atomicfile.Write(PublicKeyFile(path), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
			return nil, fmt.Errorf("auth: %w", err)
		}
		return key, nil
	}
	if err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("auth: %s: not a PEM private key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("auth: %s: %w", path, err)
	}
	key, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("auth: %s: not an Ed25519 key", path)
	}
	return key, nil
}

// LoadPublicKey reads the token service's Ed25519 public key (PKIX PEM) at path.
func LoadPublicKey(path string) (ed25519.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("auth: %s: not a PEM public key", path)
	}
	k, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("auth: %s: %w", path, err)
	}
	key, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("auth: %s: not an Ed25519 key", path)
	}
	return key, nil
}

// TokenSource obtains access tokens for one audience from a token service over mutual
// TLS as src, and caches each until shortly before it expires. It implements
// rpc.CertificateTokenFetcher: it keeps the certificates src has had (until they
// expire), so that it can also mint a token bound to an earlier certificate for a
// connection opened before src rotated.
type TokenSource struct {
	src      transport.Source
	url      string
	server   transport.Authorizer
	audience string
	now      func() time.Time
	hcOpts   []rpc.ClientOption

	mu     sync.Mutex
	leaves map[string]*leafTokens // by certificate thumbprint
	stats  TokenStats
}

// TokenStats counts what a TokenSource fetched.
type TokenStats struct {
	Fetched int64 // tokens obtained from the token service
	// Early counts fetches that replaced a cached token with less than a fifth of its
	// life left, before any server refused it.
	Early int64
	// Forced counts fetches asked with refresh set: after a server refused the token
	// (expired, or bound to another certificate).
	Forced int64
}

// leafTokens is the token service client and cached token of one certificate.
type leafTokens struct {
	svid   *x509svid.SVID
	hc     *http.Client
	client authv1connect.TokenServiceClient
	token  string
	exp    time.Time
	life   time.Duration
}

// NewTokenSource returns a TokenSource for tokens to audience from the token service at
// url, whose SPIFFE ID server authorizes.
func NewTokenSource(src transport.Source, url string, server transport.Authorizer, audience spiffeid.ID, opts ...TokenSourceOption) *TokenSource {
	cfg := tokenSourceConfig{now: time.Now}
	for _, o := range opts {
		o.applyToTokenSource(&cfg)
	}
	if cfg.now == nil {
		cfg.now = time.Now
	}
	return &TokenSource{src: src, url: url, server: server, audience: audience.String(), now: cfg.now, hcOpts: cfg.hcOpts, leaves: map[string]*leafTokens{}}
}

// Stats returns what the TokenSource has fetched so far.
func (t *TokenSource) Stats() TokenStats {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.stats
}

// Token returns a token bound to src's current certificate: the cached one unless
// refresh is set, none is cached, or it has less than a fifth of its life left.
func (t *TokenSource) Token(ctx context.Context, refresh bool) (string, error) {
	svid, err := t.src.GetX509SVID()
	if err != nil {
		return "", err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	x5t := rpc.CertThumbprint(svid.Certificates[0])
	l, ok := t.leaves[x5t]
	if !ok {
		t.prune()
		l = t.newLeaf(svid)
		t.leaves[x5t] = l
	}
	return t.mint(ctx, l, refresh)
}

// TokenForCertificate returns a token bound to an earlier certificate of src, which
// must not have expired.
func (t *TokenSource) TokenForCertificate(ctx context.Context, x5t string) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	l, ok := t.leaves[x5t]
	if !ok || !t.now().Before(l.svid.Certificates[0].NotAfter) {
		return "", errors.New("auth: no valid certificate with that thumbprint")
	}
	return t.mint(ctx, l, false)
}

// newLeaf is the state for one certificate: its own client, presenting that
// certificate, so the token service binds to it.
func (t *TokenSource) newLeaf(svid *x509svid.SVID) *leafTokens {
	hc := rpc.NewHTTPClient(fixedSVID{svid: svid, Source: t.src}, t.server, t.hcOpts...)
	return &leafTokens{svid: svid, hc: hc, client: authv1connect.NewTokenServiceClient(hc, t.url, rpc.ClientOptions()...)}
}

func (t *TokenSource) mint(ctx context.Context, l *leafTokens, refresh bool) (string, error) {
	if !refresh && l.token != "" && t.now().Before(l.exp.Add(-l.life/5)) {
		return l.token, nil
	}
	res, err := l.client.IssueToken(ctx, connect.NewRequest(&authv1.IssueTokenRequest{Audience: t.audience}))
	if err != nil {
		return "", err
	}
	t.stats.Fetched++
	switch {
	case refresh:
		t.stats.Forced++
	case l.token != "":
		t.stats.Early++
	}
	l.token, l.exp = res.Msg.GetToken(), time.Unix(res.Msg.GetExpiresUnix(), 0)
	l.life = l.exp.Sub(t.now())
	return l.token, nil
}

// prune forgets expired certificates.
func (t *TokenSource) prune() {
	for k, l := range t.leaves {
		if !t.now().Before(l.svid.Certificates[0].NotAfter) {
			l.hc.CloseIdleConnections()
			delete(t.leaves, k)
		}
	}
}

// fixedSVID presents one certificate, with the trust bundles of the source it came from.
type fixedSVID struct {
	svid *x509svid.SVID
	transport.Source
}

func (f fixedSVID) GetX509SVID() (*x509svid.SVID, error) { return f.svid, nil }
