package rpc

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/golang-jwt/jwt/v5"
)

// Continuous authentication: besides mutual TLS at the handshake, a server can require
// on every call a short-lived access token (a JWT signed with EdDSA by the token
// service, package services/auth) whose audience is this server and whose cnf claim
// binds it to the caller's client certificate (RFC 8705, x5t#S256): a token stolen
// from a caller is useless on any other TLS connection.

// TokenClaims are the claims of a Veil access token.
type TokenClaims struct {
	jwt.RegisteredClaims
	// Cnf is the confirmation claim: the SHA-256 thumbprint of the certificate the
	// token is bound to.
	Cnf Confirmation `json:"cnf"`
}

// Confirmation is RFC 8705's certificate-bound confirmation claim.
type Confirmation struct {
	X5tS256 string `json:"x5t#S256"`
}

// CertThumbprint is the RFC 8705 x5t#S256 of cert: base64url (no padding) of the
// SHA-256 of its DER encoding.
func CertThumbprint(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.Raw)
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// Reasons a call is refused by WithBoundTokens, in the "veil-auth-reason" response
// header and the reason label of veil_rpc_auth_refusals_total.
const (
	AuthReasonMissing  = "token_missing"        // no bearer token
	AuthReasonExpired  = "token_expired"        // past exp (plus the leeway): refresh and retry
	AuthReasonInvalid  = "token_invalid"        // bad signature, algorithm, issuer, claims or encoding
	AuthReasonNotBound = "token_not_bound"      // cnf or sub is not this connection's certificate or caller
	AuthReasonAudience = "token_wrong_audience" // aud is not exactly this server
)

// Clock skew WithBoundTokens tolerates on exp, nbf and iat.
const (
	DefaultTokenLeeway = 10 * time.Second
	MaxTokenLeeway     = time.Minute
)

// AuthReason returns the reason a server gave for refusing a call's token, or "".
func AuthReason(err error) string {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Meta().Get("veil-auth-reason")
	}
	return ""
}

type peerCertKey struct{}

// WithPeerCertificates keeps each caller's verified leaf certificate in the request
// context, for PeerCertificate.
func WithPeerCertificates() ServerOption {
	return serverOption(func(c *serverConfig) { c.middleware = append(c.middleware, withPeerCert) })
}

func withPeerCert(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			r = r.WithContext(context.WithValue(r.Context(), peerCertKey{}, r.TLS.PeerCertificates[0]))
		}
		next.ServeHTTP(w, r)
	})
}

// PeerCertificate returns the caller's leaf certificate on a server built
// WithPeerCertificates (or WithBoundTokens).
func PeerCertificate(ctx context.Context) (*x509.Certificate, bool) {
	c, ok := ctx.Value(peerCertKey{}).(*x509.Certificate)
	return c, ok
}

// TokenVerifier checks access tokens from one issuer for one audience. Every field but
// Now and Leeway is required: with an empty one every token is refused.
type TokenVerifier struct {
	Issuer   string            // the token service's SPIFFE ID
	Key      ed25519.PublicKey // its signing key
	Audience string            // this server's SPIFFE ID
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Leeway is the clock skew tolerated on exp, nbf and iat: zero means
	// DefaultTokenLeeway, and more than MaxTokenLeeway counts as MaxTokenLeeway.
	Leeway time.Duration
}

// WithBoundTokens requires a valid bound access token on every call: signed with EdDSA
// (the only algorithm accepted) by v.Key, from v.Issuer, with exactly one audience,
// v.Audience, carrying exp, nbf and iat and valid now (within the leeway), bound to
// the client certificate of the connection it arrives on, and naming the caller's
// SPIFFE ID as its subject. Otherwise the call fails with unauthenticated, a reason
// (AuthReason) and a message saying whether fetching a new token helps; the server
// counts it in veil_rpc_auth_refusals_total{procedure,reason}. Health, reflection and
// the exempt procedures need no token.
func WithBoundTokens(v TokenVerifier, exempt ...string) ServerOption {
	if v.Now == nil {
		v.Now = time.Now
	}
	switch {
	case v.Leeway <= 0:
		v.Leeway = DefaultTokenLeeway
	case v.Leeway > MaxTokenLeeway:
		v.Leeway = MaxTokenLeeway
	}
	a := &tokenAuth{v: v, exempt: healthAndReflection()}
	for _, p := range exempt {
		a.exempt[p] = true
	}
	return serverOption(func(c *serverConfig) {
		c.middleware = append(c.middleware, withPeerCert)
		c.interceptors = append(c.interceptors, serverCheck(a.check))
		c.tokenAuth = append(c.tokenAuth, a)
	})
}

type tokenAuth struct {
	v       TokenVerifier
	exempt  map[string]bool
	metrics *Metrics // set by NewServer
}

func authError(reason string, err error) error {
	ce := connect.NewError(connect.CodeUnauthenticated, err)
	ce.Meta().Set("veil-auth-reason", reason)
	return ce
}

func (a *tokenAuth) check(ctx context.Context, procedure string, h http.Header) error {
	if a.exempt[procedure] {
		return nil
	}
	err := a.verify(ctx, h)
	if reason := AuthReason(err); reason != "" && a.metrics != nil {
		a.metrics.authRefused.WithLabelValues(procedure, reason).Inc()
	}
	return err
}

func (a *tokenAuth) verify(ctx context.Context, h http.Header) error {
	cert, ok := PeerCertificate(ctx)
	peer, ok2 := PeerFromContext(ctx)
	if !ok || !ok2 {
		return authError(AuthReasonNotBound, errors.New("rpc: no client certificate to bind the access token to"))
	}
	raw, ok := strings.CutPrefix(h.Get("Authorization"), "Bearer ")
	if !ok || raw == "" {
		return authError(AuthReasonMissing, errors.New("rpc: this server requires an access token (Authorization: Bearer) bound to your certificate: fetch one from the token service"))
	}
	if a.v.Issuer == "" || a.v.Audience == "" || len(a.v.Key) != ed25519.PublicKeySize {
		return authError(AuthReasonInvalid, errors.New("rpc: access token rejected: the server has no complete token verifier"))
	}
	var claims TokenClaims
	_, err := jwt.ParseWithClaims(raw, &claims, func(*jwt.Token) (any, error) { return a.v.Key, nil },
		jwt.WithValidMethods([]string{jwt.SigningMethodEdDSA.Alg()}), jwt.WithIssuer(a.v.Issuer),
		jwt.WithAudience(a.v.Audience), jwt.WithExpirationRequired(), jwt.WithNotBeforeRequired(), jwt.WithIssuedAt(),
		jwt.WithLeeway(a.v.Leeway), jwt.WithTimeFunc(a.v.Now), jwt.WithStrictDecoding())
	switch {
	case errors.Is(err, jwt.ErrTokenSignatureInvalid), errors.Is(err, jwt.ErrTokenMalformed), errors.Is(err, jwt.ErrTokenUnverifiable):
		// Nothing a token says counts before its signature does.
		return authError(AuthReasonInvalid, fmt.Errorf("rpc: access token rejected: %v", err))
	case errors.Is(err, jwt.ErrTokenExpired):
		return authError(AuthReasonExpired, errors.New("rpc: access token expired: fetch a new one from the token service and retry"))
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return authError(AuthReasonAudience, fmt.Errorf("rpc: access token is for another audience: ask the token service for one for %s", a.v.Audience))
	case err != nil:
		return authError(AuthReasonInvalid, fmt.Errorf("rpc: access token rejected: %v", err))
	case claims.IssuedAt == nil:
		return authError(AuthReasonInvalid, errors.New("rpc: access token rejected: no iat claim"))
	case len(claims.Audience) != 1:
		// A token for several audiences could be replayed from one to another.
		return authError(AuthReasonAudience, fmt.Errorf("rpc: access token names %d audiences, want exactly %s", len(claims.Audience), a.v.Audience))
	case claims.Cnf.X5tS256 != CertThumbprint(cert):
		// The connection's thumbprint is public (a hash of the certificate the client
		// sent); it tells a client whose certificate rotated which token this
		// connection needs.
		err := authError(AuthReasonNotBound, errors.New("rpc: access token is bound to another certificate: fetch one bound to this connection's certificate and retry"))
		err.(*connect.Error).Meta().Set("veil-auth-x5t", CertThumbprint(cert))
		return err
	case claims.Subject != peer.ID.String():
		return authError(AuthReasonNotBound, fmt.Errorf("rpc: access token is for %q, not the caller %s", claims.Subject, peer.ID))
	}
	return nil
}

// TokenFetcher obtains a fresh access token (services/auth's TokenSource is one).
type TokenFetcher interface {
	// Token returns a cached token unless it is about to expire or refresh is set.
	Token(ctx context.Context, refresh bool) (string, error)
}

// CertificateTokenFetcher is a TokenFetcher that can also provide a token bound to an
// earlier certificate of the caller, identified by its thumbprint: a connection opened
// before the caller's certificate rotated still presents the old one.
type CertificateTokenFetcher interface {
	TokenFetcher
	TokenForCertificate(ctx context.Context, x5t string) (string, error)
}

// WithAccessTokens is a client interceptor that sends a bound access token with every
// call, and when the server refuses it as expired, not bound or invalid (a token signed
// with a retired key), fetches a new one and retries the call once: for a connection that presents an earlier certificate of the
// caller, a token bound to that certificate if f is a CertificateTokenFetcher. Only
// unary calls are retried; streams get the token.
func WithAccessTokens(f TokenFetcher) connect.ClientOption {
	return connect.WithInterceptors(tokenClient{f})
}

type tokenClient struct{ f TokenFetcher }

func (c tokenClient) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		tok, err := c.f.Token(ctx, false)
		if err != nil {
			return nil, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("rpc: access token: %w", err))
		}
		req.Header().Set("Authorization", "Bearer "+tok)
		res, err := next(ctx, req)
		switch AuthReason(err) {
		case AuthReasonExpired, AuthReasonNotBound, AuthReasonInvalid:
			// A new token helps: this one expired, was bound to an older certificate, or
			// was signed with a key the token service has since replaced.
		default:
			return res, err
		}
		x5t := ""
		var ce *connect.Error
		if errors.As(err, &ce) {
			x5t = ce.Meta().Get("veil-auth-x5t")
		}
		if cf, ok := c.f.(CertificateTokenFetcher); ok && AuthReason(err) == AuthReasonNotBound && x5t != "" {
			tok, err = cf.TokenForCertificate(ctx, x5t)
		} else {
			tok, err = c.f.Token(ctx, true)
		}
		if err != nil {
			return nil, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("rpc: access token: %w", err))
		}
		req.Header().Set("Authorization", "Bearer "+tok)
		return next(ctx, req)
	}
}

func (c tokenClient) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if tok, err := c.f.Token(ctx, false); err == nil {
			conn.RequestHeader().Set("Authorization", "Bearer "+tok)
		}
		return conn
	}
}

func (c tokenClient) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}
