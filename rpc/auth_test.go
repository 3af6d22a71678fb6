package rpc_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/golang-jwt/jwt/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

const issuerID = "spiffe://example.org/auth"

// TestBoundTokenVerification attacks WithBoundTokens with forged and malformed tokens:
// each is refused as unauthenticated with its reason, and counted under it.
func TestBoundTokenVerification(t *testing.T) {
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	e := start(t, rpc.WithBoundTokens(rpc.TokenVerifier{Issuer: issuerID, Key: pub, Audience: serverID, Now: func() time.Time { return now }}))
	src := identity(t, e.ca, e.dir, clientID)
	svid, _ := src.GetX509SVID()
	other, _ := identity(t, e.ca, e.dir, "spiffe://example.org/ns/prod/sa/other").GetX509SVID()
	client := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(src, transport.AuthorizeID(spiffeid.RequireFromString(serverID))), e.url, rpc.ClientOptions()...)

	// claims are those the token service issues, which the test then spoils.
	claims := func() rpc.TokenClaims {
		return rpc.TokenClaims{
			RegisteredClaims: jwt.RegisteredClaims{
				Issuer: issuerID, Subject: clientID, Audience: jwt.ClaimStrings{serverID},
				IssuedAt: jwt.NewNumericDate(now.Add(-time.Minute)), NotBefore: jwt.NewNumericDate(now.Add(-time.Minute)),
				ExpiresAt: jwt.NewNumericDate(now.Add(4 * time.Minute)), ID: "jti",
			},
			Cnf: rpc.Confirmation{X5tS256: rpc.CertThumbprint(svid.Certificates[0])},
		}
	}
	sign := func(c rpc.TokenClaims) string {
		tok, err := jwt.NewWithClaims(jwt.SigningMethodEdDSA, c).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	with := func(f func(*rpc.TokenClaims)) string {
		c := claims()
		f(&c)
		return sign(c)
	}
	none, err := jwt.NewWithClaims(jwt.SigningMethodNone, claims()).SignedString(jwt.UnsafeAllowNoneSignatureType)
	if err != nil {
		t.Fatal(err)
	}
	// Key confusion: HMAC keyed with the public key, which every server holds.
	hmac, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims()).SignedString([]byte(pub))
	if err != nil {
		t.Fatal(err)
	}
	forged, err := jwt.NewWithClaims(jwt.SigningMethodEdDSA, claims()).SignedString(otherKey)
	if err != nil {
		t.Fatal(err)
	}
	valid := sign(claims())
	for _, tc := range []struct {
		name, header, reason string
	}{
		{"valid", "Bearer " + valid, ""},
		{"no header", "", rpc.AuthReasonMissing},
		{"basic credentials", "Basic dXNlcjpwYXNz", rpc.AuthReasonMissing},
		{"empty bearer", "Bearer ", rpc.AuthReasonMissing},
		{"alg none", "Bearer " + none, rpc.AuthReasonInvalid},
		{"HS256 keyed with the public key", "Bearer " + hmac, rpc.AuthReasonInvalid},
		{"signed by another key", "Bearer " + forged, rpc.AuthReasonInvalid},
		{"truncated signature", "Bearer " + valid[:len(valid)-4], rpc.AuthReasonInvalid},
		{"another issuer", "Bearer " + with(func(c *rpc.TokenClaims) { c.Issuer = "spiffe://example.org/rogue" }), rpc.AuthReasonInvalid},
		{"no exp", "Bearer " + with(func(c *rpc.TokenClaims) { c.ExpiresAt = nil }), rpc.AuthReasonInvalid},
		{"no nbf", "Bearer " + with(func(c *rpc.TokenClaims) { c.NotBefore = nil }), rpc.AuthReasonInvalid},
		{"no iat", "Bearer " + with(func(c *rpc.TokenClaims) { c.IssuedAt = nil }), rpc.AuthReasonInvalid},
		{"nbf past the leeway", "Bearer " + with(func(c *rpc.TokenClaims) { c.NotBefore = jwt.NewNumericDate(now.Add(time.Minute)) }), rpc.AuthReasonInvalid},
		{"iat past the leeway", "Bearer " + with(func(c *rpc.TokenClaims) { c.IssuedAt = jwt.NewNumericDate(now.Add(time.Minute)) }), rpc.AuthReasonInvalid},
		{"nbf within the leeway", "Bearer " + with(func(c *rpc.TokenClaims) { c.NotBefore = jwt.NewNumericDate(now.Add(5 * time.Second)) }), ""},
		{"expired within the leeway", "Bearer " + with(func(c *rpc.TokenClaims) { c.ExpiresAt = jwt.NewNumericDate(now.Add(-5 * time.Second)) }), ""},
		{"expired", "Bearer " + with(func(c *rpc.TokenClaims) {
			c.ExpiresAt = jwt.NewNumericDate(now.Add(-rpc.DefaultTokenLeeway - time.Second))
		}), rpc.AuthReasonExpired},
		{"another audience", "Bearer " + with(func(c *rpc.TokenClaims) { c.Audience = jwt.ClaimStrings{"spiffe://example.org/other"} }), rpc.AuthReasonAudience},
		{"this and another audience", "Bearer " + with(func(c *rpc.TokenClaims) { c.Audience = append(c.Audience, "spiffe://example.org/other") }), rpc.AuthReasonAudience},
		{"bound to another certificate", "Bearer " + with(func(c *rpc.TokenClaims) { c.Cnf.X5tS256 = rpc.CertThumbprint(other.Certificates[0]) }), rpc.AuthReasonNotBound},
		{"no cnf", "Bearer " + with(func(c *rpc.TokenClaims) { c.Cnf.X5tS256 = "" }), rpc.AuthReasonNotBound},
		{"another subject", "Bearer " + with(func(c *rpc.TokenClaims) { c.Subject = "spiffe://example.org/ns/prod/sa/other" }), rpc.AuthReasonNotBound},
	} {
		before := metricValue(t, e, "veil_rpc_auth_refusals_total", "reason", tc.reason)
		req := connect.NewRequest(&echov1.EchoRequest{Message: "hi"})
		if tc.header != "" {
			req.Header().Set("Authorization", tc.header)
		}
		_, err := client.Echo(context.Background(), req)
		if tc.reason == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
			continue
		}
		if connect.CodeOf(err) != connect.CodeUnauthenticated || rpc.AuthReason(err) != tc.reason {
			t.Errorf("%s: %v (reason %q), want unauthenticated (%s)", tc.name, err, rpc.AuthReason(err), tc.reason)
		}
		if n := metricValue(t, e, "veil_rpc_auth_refusals_total", "reason", tc.reason) - before; n != 1 {
			t.Errorf("%s: veil_rpc_auth_refusals_total{reason=%q} rose by %v, want 1", tc.name, tc.reason, n)
		}
	}

	// The leeway is bounded: asking for an hour gets MaxTokenLeeway.
	lax := start(t, rpc.WithBoundTokens(rpc.TokenVerifier{Issuer: issuerID, Key: pub, Audience: serverID, Now: func() time.Time { return now }, Leeway: time.Hour}))
	laxSrc := identity(t, lax.ca, lax.dir, clientID)
	laxSVID, _ := laxSrc.GetX509SVID()
	laxClient := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(laxSrc, transport.AuthorizeID(spiffeid.RequireFromString(serverID))), lax.url, rpc.ClientOptions()...)
	for _, tc := range []struct {
		past   time.Duration
		reason string
	}{{rpc.MaxTokenLeeway - time.Second, ""}, {rpc.MaxTokenLeeway + time.Second, rpc.AuthReasonExpired}} {
		req := connect.NewRequest(&echov1.EchoRequest{Message: "hi"})
		req.Header().Set("Authorization", "Bearer "+with(func(c *rpc.TokenClaims) {
			c.ExpiresAt = jwt.NewNumericDate(now.Add(-tc.past))
			c.Cnf.X5tS256 = rpc.CertThumbprint(laxSVID.Certificates[0])
		}))
		if _, err := laxClient.Echo(context.Background(), req); rpc.AuthReason(err) != tc.reason {
			t.Errorf("expired %s ago with Leeway 1h: %v, want reason %q", tc.past, err, tc.reason)
		}
	}

	// A verifier without a key refuses every token.
	keyless := start(t, rpc.WithBoundTokens(rpc.TokenVerifier{Issuer: issuerID, Audience: serverID, Now: func() time.Time { return now }}))
	kSrc := identity(t, keyless.ca, keyless.dir, clientID)
	kSVID, _ := kSrc.GetX509SVID()
	req := connect.NewRequest(&echov1.EchoRequest{Message: "hi"})
	req.Header().Set("Authorization", "Bearer "+with(func(c *rpc.TokenClaims) { c.Cnf.X5tS256 = rpc.CertThumbprint(kSVID.Certificates[0]) }))
	_, err = echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(kSrc, transport.AuthorizeID(spiffeid.RequireFromString(serverID))), keyless.url, rpc.ClientOptions()...).
		Echo(context.Background(), req)
	if rpc.AuthReason(err) != rpc.AuthReasonInvalid {
		t.Fatalf("verifier without a key: %v", err)
	}
}

// fakeFetcher hands out tokens[0] until asked to refresh, then tokens[1], ...
type fakeFetcher struct {
	tokens    []string
	refreshes int
}

func (f *fakeFetcher) Token(_ context.Context, refresh bool) (string, error) {
	if refresh && f.refreshes < len(f.tokens)-1 {
		f.refreshes++
	}
	return f.tokens[f.refreshes], nil
}

// TestAccessTokensRetry: WithAccessTokens refreshes and retries once where a new token
// helps (expired; signed with a retired key), and not where it cannot (another
// audience), and never more than once.
func TestAccessTokensRetry(t *testing.T) {
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	_, retired, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Now()
	e := start(t, rpc.WithBoundTokens(rpc.TokenVerifier{Issuer: issuerID, Key: pub, Audience: serverID}))
	src := identity(t, e.ca, e.dir, clientID)
	svid, _ := src.GetX509SVID()
	hc := rpc.NewHTTPClient(src, transport.AuthorizeID(spiffeid.RequireFromString(serverID)))
	token := func(k ed25519.PrivateKey, aud string, exp time.Time) string {
		tok, err := jwt.NewWithClaims(jwt.SigningMethodEdDSA, rpc.TokenClaims{
			RegisteredClaims: jwt.RegisteredClaims{Issuer: issuerID, Subject: clientID, Audience: jwt.ClaimStrings{aud},
				IssuedAt: jwt.NewNumericDate(now.Add(-time.Hour)), NotBefore: jwt.NewNumericDate(now.Add(-time.Hour)), ExpiresAt: jwt.NewNumericDate(exp)},
			Cnf: rpc.Confirmation{X5tS256: rpc.CertThumbprint(svid.Certificates[0])},
		}).SignedString(k)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	good := token(key, serverID, now.Add(time.Hour))
	expired := token(key, serverID, now.Add(-time.Hour))
	for _, tc := range []struct {
		name      string
		tokens    []string
		refreshes int
		reason    string // of the final error; "" for success
	}{
		{"expired, then fresh", []string{expired, good}, 1, ""},
		{"retired key, then the new one", []string{token(retired, serverID, now.Add(time.Hour)), good}, 1, ""},
		{"another audience: no retry", []string{token(key, "spiffe://example.org/other", now.Add(time.Hour)), good}, 0, rpc.AuthReasonAudience},
		{"still expired after one retry", []string{expired, expired, good}, 1, rpc.AuthReasonExpired},
	} {
		f := &fakeFetcher{tokens: tc.tokens}
		c := echov1connect.NewEchoServiceClient(hc, e.url, append(rpc.ClientOptions(), rpc.WithAccessTokens(f))...)
		_, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
		if rpc.AuthReason(err) != tc.reason || (tc.reason == "" && err != nil) || f.refreshes != tc.refreshes {
			t.Errorf("%s: %v after %d refreshes, want reason %q after %d", tc.name, err, f.refreshes, tc.reason, tc.refreshes)
		}
	}
}
