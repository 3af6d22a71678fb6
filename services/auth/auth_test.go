package auth

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/veilrpc/veil/gen/veil/auth/v1/authv1connect"
	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/echo"
	"github.com/veilrpc/veil/transport"
)

var (
	authID   = spiffeid.RequireFromString("spiffe://example.org/auth")
	echoID   = spiffeid.RequireFromString("spiffe://example.org/echo")
	callerA  = spiffeid.RequireFromString("spiffe://example.org/a")
	callerB  = spiffeid.RequireFromString("spiffe://example.org/b")
	allowAll = "spiffe://example.org"
)

func source(t *testing.T, ca *pki.CA, id spiffeid.ID) transport.Source {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	chain, err := ca.Issue(id, &key.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return transport.StaticSource{SVID: &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key},
		Bundles: x509bundle.NewSet(x509bundle.FromX509Authorities(ca.TrustDomain(), ca.Bundle()))}
}

func start(t *testing.T, srv *rpc.Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	})
	return "https://" + ln.Addr().String()
}

// rotatingSource is a Source whose certificate the test replaces.
type rotatingSource struct {
	transport.Source // bundles
	svid             atomic.Pointer[x509svid.SVID]
}

func (r *rotatingSource) GetX509SVID() (*x509svid.SVID, error) { return r.svid.Load(), nil }

func TestBoundTokens(t *testing.T) {
	ca, err := pki.InitCA(filepath.Join(t.TempDir(), "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	var skew, clientSkew atomic.Int64 // how far the servers' and the client's clocks run ahead
	clock := func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	clientClock := func() time.Time { return time.Now().Add(time.Duration(clientSkew.Load())) }

	key, err := LoadOrCreateKey(filepath.Join(t.TempDir(), "auth.key"))
	if err != nil {
		t.Fatal(err)
	}
	tokens, err := rpc.NewServer(source(t, ca, authID), rpc.WithPeerCertificates(),
		rpc.WithPolicy(rpc.NewPolicy().MustAllow("/"+authv1connect.TokenServiceName+"/*", allowAll)))
	if err != nil {
		t.Fatal(err)
	}
	svc := New(authID, key, time.Minute, WithClock(clock))
	rpc.Register(tokens, authv1connect.NewTokenServiceHandler, authv1connect.TokenServiceHandler(svc))
	authURL := start(t, tokens)

	echoSrv, err := rpc.NewServer(source(t, ca, echoID),
		rpc.WithPolicy(rpc.NewPolicy().MustAllow("/"+echov1connect.EchoServiceName+"/*", allowAll)),
		rpc.WithBoundTokens(rpc.TokenVerifier{Issuer: authID.String(), Key: key.Public().(ed25519.PublicKey), Audience: echoID.String(), Now: clock}))
	if err != nil {
		t.Fatal(err)
	}
	rpc.Register(echoSrv, echov1connect.NewEchoServiceHandler, echov1connect.EchoServiceHandler(echo.New()))
	echoURL := start(t, echoSrv)

	srcA := &rotatingSource{Source: source(t, ca, callerA)}
	first, _ := srcA.Source.GetX509SVID()
	srcA.svid.Store(first)
	srcB := source(t, ca, callerB)
	fetcher := NewTokenSource(srcA, authURL, transport.AuthorizeID(authID), echoID, WithClock(clientClock))
	hcA := rpc.NewHTTPClient(srcA, transport.AuthorizeID(echoID))
	withTokens := echov1connect.NewEchoServiceClient(hcA, echoURL, append(rpc.ClientOptions(), rpc.WithAccessTokens(fetcher))...)
	ctx := context.Background()
	req := func() *connect.Request[echov1.EchoRequest] {
		return connect.NewRequest(&echov1.EchoRequest{Message: "hi"})
	}
	for range 3 {
		if _, err := withTokens.Echo(ctx, req()); err != nil {
			t.Fatal(err)
		}
	}
	if n, st := svc.Issued(), fetcher.Stats(); n != 1 || st != (TokenStats{Fetched: 1}) {
		t.Fatalf("%d tokens issued for 3 calls (%+v), want 1 (cached)", n, st)
	}
	// Both clocks move to where the token has less than a fifth of its life left: the
	// client replaces it before sending, and no server refuses anything.
	skew.Add(int64(50 * time.Second))
	clientSkew.Add(int64(50 * time.Second))
	unauthenticated := refused(t, echoSrv)
	if _, err := withTokens.Echo(ctx, req()); err != nil {
		t.Fatalf("call near expiry: %v", err)
	}
	if n, st := svc.Issued(), fetcher.Stats(); n != 2 || st != (TokenStats{Fetched: 2, Early: 1}) || refused(t, echoSrv) != unauthenticated {
		t.Fatalf("near expiry: %d tokens issued (%+v), want 2 with one early refresh and no refusal", n, st)
	}
	// The server's clock alone passes the token's expiry: the call is refused as
	// expired, the client fetches a new token and retries once, and the call succeeds.
	skew.Add(int64(2 * time.Minute))
	if _, err := withTokens.Echo(ctx, req()); err != nil {
		t.Fatalf("call after expiry: %v", err)
	}
	if n, st := svc.Issued(), fetcher.Stats(); n != 3 || st != (TokenStats{Fetched: 3, Early: 1, Forced: 1}) {
		t.Fatalf("%d tokens issued after expiry (%+v), want 3 with one forced refresh", n, st)
	}

	// The caller's certificate rotates while its connection to echo, opened with the
	// old one, stays up: the new token is refused as not bound to that connection, and
	// the client retries with a token for the old certificate.
	second, _ := source(t, ca, callerA).GetX509SVID()
	srcA.svid.Store(second)
	refusedBefore := refused(t, echoSrv)
	if _, err := withTokens.Echo(ctx, req()); err != nil {
		t.Fatalf("call on a connection from before the rotation: %v", err)
	}
	if n := refused(t, echoSrv) - refusedBefore; n != 1 {
		t.Fatalf("%v refusals before the retry, want 1 (token_not_bound on the old connection)", n)
	}
	fresh := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(srcA, transport.AuthorizeID(echoID)), echoURL,
		append(rpc.ClientOptions(), rpc.WithAccessTokens(fetcher))...)
	if _, err := fresh.Echo(ctx, req()); err != nil {
		t.Fatalf("call on a new connection after the rotation: %v", err)
	}

	// Refusals, without the retrying interceptor.
	tokA, err := fetcher.Token(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	otherAud := NewTokenSource(srcA, authURL, transport.AuthorizeID(authID), spiffeid.RequireFromString("spiffe://example.org/other"))
	tokOther, err := otherAud.Token(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	plainA := echov1connect.NewEchoServiceClient(hcA, echoURL, rpc.ClientOptions()...)
	plainB := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(srcB, transport.AuthorizeID(echoID)), echoURL, rpc.ClientOptions()...)
	for _, tc := range []struct {
		name   string
		client echov1connect.EchoServiceClient
		token  string
		reason string
	}{
		{"no token", plainA, "", rpc.AuthReasonMissing},
		{"garbage", plainA, "not.a.jwt", rpc.AuthReasonInvalid},
		{"another audience", plainA, tokOther, rpc.AuthReasonAudience},
		{"stolen by another caller", plainB, tokA, rpc.AuthReasonNotBound},
	} {
		r := req()
		if tc.token != "" {
			r.Header().Set("Authorization", "Bearer "+tc.token)
		}
		before := refusalsFor(t, echoSrv, tc.reason)
		_, err := tc.client.Echo(ctx, r)
		if connect.CodeOf(err) != connect.CodeUnauthenticated || rpc.AuthReason(err) != tc.reason {
			t.Errorf("%s: %v (%q), want unauthenticated (%s)", tc.name, err, rpc.AuthReason(err), tc.reason)
		}
		if n := refusalsFor(t, echoSrv, tc.reason) - before; n != 1 {
			t.Errorf("%s: veil_rpc_auth_refusals_total{reason=%q} rose by %v, want 1", tc.name, tc.reason, n)
		}
	}
	skew.Store(int64(10 * time.Minute))
	r := req()
	r.Header().Set("Authorization", "Bearer "+tokA)
	before := refusalsFor(t, echoSrv, rpc.AuthReasonExpired)
	if _, err := plainA.Echo(ctx, r); rpc.AuthReason(err) != rpc.AuthReasonExpired {
		t.Fatalf("expired token without retry: %v", err)
	}
	if n := refusalsFor(t, echoSrv, rpc.AuthReasonExpired) - before; n != 1 {
		t.Fatalf("veil_rpc_auth_refusals_total{reason=token_expired} rose by %v, want 1", n)
	}
}

// metricSum sums srv's counter name over the series whose label has value.
func metricSum(t *testing.T, srv *rpc.Server, name, label, value string) float64 {
	t.Helper()
	v, err := rpc.CounterValue(srv.Registerer().(prometheus.Gatherer), name, label, value)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// refused counts the echo calls the server answered with unauthenticated.
func refused(t *testing.T, srv *rpc.Server) float64 {
	t.Helper()
	return metricSum(t, srv, "veil_rpc_calls_total", "code", "unauthenticated")
}

// refusalsFor is the server's veil_rpc_auth_refusals_total for reason.
func refusalsFor(t *testing.T, srv *rpc.Server, reason string) float64 {
	t.Helper()
	return metricSum(t, srv, "veil_rpc_auth_refusals_total", "reason", reason)
}

func TestLoadOrCreateKey(t *testing.T) {
	p := filepath.Join(t.TempDir(), "k")
	k1, err := LoadOrCreateKey(p)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := LoadOrCreateKey(p)
	if err != nil || !k1.Equal(k2) {
		t.Fatalf("reload: %v", err)
	}
	if _, err := LoadOrCreateKey(filepath.Join(t.TempDir(), "missing", "k")); err == nil {
		t.Fatal("key in a missing directory")
	}
	// The public key beside it is what servers verify with; the private key is 0600.
	pub, err := LoadPublicKey(PublicKeyFile(p))
	if err != nil || !pub.Equal(k1.Public()) {
		t.Fatalf("public key: %v", err)
	}
	if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("signing key mode %v (%v), want 0600", st.Mode().Perm(), err)
	}
	if _, err := LoadPublicKey(p); err == nil {
		t.Fatal("a private key read as a public key")
	}
}
