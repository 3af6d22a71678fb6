package ca_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	cav1 "github.com/veilrpc/veil/gen/veil/ca/v1"
	"github.com/veilrpc/veil/gen/veil/ca/v1/cav1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/ca"
	"github.com/veilrpc/veil/transport"
)

const td = "example.org"

// caEnv is a running online CA on loopback.
type caEnv struct {
	dir    string
	url    string
	addr   string
	svc    *ca.Service
	server *rpc.Server
	reg    *prometheus.Registry
	stop   func()
}

func newCADir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := pki.InitCA(dir, td); err != nil {
		t.Fatal(err)
	}
	return dir
}

// startCA serves the CA in dir on addr ("127.0.0.1:0" for any port).
func startCA(t *testing.T, dir, addr string, opts ...ca.Option) *caEnv {
	t.Helper()
	svc, err := ca.New(dir, append([]ca.Option{ca.WithRateLimit(100, 100)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	srv, err := ca.NewServer(svc, nil, nil, rpc.WithMetrics(reg), rpc.WithGracePeriod(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	for i := 0; ; i++ { // a restarted CA rebinds its old port, which may take a moment
		ln, err = net.Listen("tcp", addr)
		if err == nil || i == 50 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	env := &caEnv{dir: dir, url: "https://" + ln.Addr().String(), addr: ln.Addr().String(), svc: svc, server: srv, reg: reg}
	stopped := false
	env.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("CA server: %v", err)
		}
	}
	t.Cleanup(env.stop)
	return env
}

func (e *caEnv) bundle(t *testing.T) *x509bundle.Bundle {
	t.Helper()
	c, err := pki.LoadCA(e.dir)
	if err != nil {
		t.Fatal(err)
	}
	return x509bundle.FromX509Authorities(c.TrustDomain(), c.Bundle())
}

func (e *caEnv) token(t *testing.T, pattern string) string {
	t.Helper()
	tok, err := ca.NewToken(e.dir, pattern, 10*time.Minute, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func (e *caEnv) result(procedure, result string) float64 {
	return counter(e.reg, "veil_ca_requests_total", map[string]string{"procedure": procedure, "result": result})
}

// join obtains a renewing identity for id with a fresh token.
func (e *caEnv) join(t *testing.T, id string, opts ...transport.RenewOption) *transport.RenewingSource {
	t.Helper()
	cl := ca.NewClient(e.url, e.bundle(t), e.token(t, id))
	src, err := transport.NewRenewingSource(context.Background(), cl, spiffeid.RequireFromString(id), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = src.Close() })
	return src
}

func csrFor(t *testing.T, uris ...string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		pu, err := neturl.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// bootstrapClient is a CA client without a certificate, as a joining workload has.
func (e *caEnv) bootstrapClient(t *testing.T) cav1connect.CAServiceClient {
	t.Helper()
	cfg := transport.BootstrapClientConfig(x509bundle.NewSet(e.bundle(t)),
		transport.WithAuthorizer(transport.AuthorizeID(ca.ServerID(spiffeid.RequireTrustDomainFromString(td)))))
	tr := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	return cav1connect.NewCAServiceClient(&http.Client{Transport: tr}, e.url, rpc.ClientOptions()...)
}

func wantRefusal(t *testing.T, err error, code connect.Code, reason string) {
	t.Helper()
	if err == nil {
		t.Fatalf("want %s (%s), got success", code, reason)
	}
	if connect.CodeOf(err) != code || ca.Reason(err) != reason {
		t.Fatalf("want %s (%s), got %s (%s): %v", code, reason, connect.CodeOf(err), ca.Reason(err), err)
	}
}

func TestJoinThenRenew(t *testing.T) {
	e := startCA(t, newCADir(t), "127.0.0.1:0")
	id := "spiffe://example.org/echo"
	src := e.join(t, id, transport.WithCertTTL(time.Hour))
	svid, _ := src.GetX509SVID()
	if svid.ID.String() != id || len(svid.Certificates[0].DNSNames) != 0 {
		t.Fatalf("joined as %s", svid.ID)
	}
	if got := time.Until(svid.Certificates[0].NotAfter); got > time.Hour || got < 59*time.Minute {
		t.Fatalf("lifetime %s, want about 1h", got)
	}
	cl := ca.NewClient(e.url, e.bundle(t), "")
	key, csr, err := transport.NewCSR(svid.ID)
	if err != nil {
		t.Fatal(err)
	}
	issued, err := cl.Renew(context.Background(), src, csr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	leaf := issued.Chain[0]
	if !key.PublicKey.Equal(leaf.PublicKey) || leaf.SerialNumber.Cmp(svid.Certificates[0].SerialNumber) == 0 {
		t.Fatal("renewal did not certify the new key")
	}
	if got := time.Until(leaf.NotAfter); got > 10*time.Second || got < 5*time.Second {
		t.Fatalf("10 s TTL gave %s", got)
	}
	if _, _, err := x509svid.Verify(issued.Chain, x509bundle.FromX509Authorities(issued.Trust.TrustDomain, issued.Trust.Roots)); err != nil {
		t.Fatal(err)
	}
	if e.result(cav1connect.CAServiceJoinProcedure, "issued") != 1 || e.result(cav1connect.CAServiceRenewProcedure, "issued") != 1 {
		t.Fatal("issuance not counted")
	}
	// A workload without a certificate reaches Join and nothing else.
	boot := e.bootstrapClient(t)
	_, err = boot.GetBundle(context.Background(), connect.NewRequest(&cav1.GetBundleRequest{}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("GetBundle without a certificate: %v", err)
	}
	_, err = boot.Renew(context.Background(), connect.NewRequest(&cav1.RenewRequest{Csr: csr}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("Renew without a certificate: %v", err)
	}
	// Nor health: the exemption is for Join alone.
	cfg := transport.BootstrapClientConfig(x509bundle.NewSet(e.bundle(t)), transport.WithAuthorizer(transport.AuthorizeAny()))
	tr := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	_, err = grpchealth.NewClient(&http.Client{Transport: tr}, e.url).Check(context.Background(), &grpchealth.CheckRequest{})
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("health without a certificate: %v", err)
	}
}

func TestJoinTokenRefusals(t *testing.T) {
	e := startCA(t, newCADir(t), "127.0.0.1:0")
	boot := e.bootstrapClient(t)
	ctx := context.Background()
	join := func(token, id string) error {
		_, err := boot.Join(ctx, connect.NewRequest(&cav1.JoinRequest{Token: token, Csr: csrFor(t, id)}))
		return err
	}
	tok := e.token(t, "spiffe://example.org/ns/*/sa/api")
	if err := join(tok, "spiffe://example.org/ns/prod/sa/api"); err != nil {
		t.Fatal(err)
	}
	wantRefusal(t, join(tok, "spiffe://example.org/ns/prod/sa/api"), connect.CodeUnauthenticated, "token_replayed")

	expired, err := ca.NewToken(e.dir, "spiffe://example.org/api", time.Minute, time.Now().Add(-2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	wantRefusal(t, join(expired, "spiffe://example.org/api"), connect.CodeUnauthenticated, "token_expired")
	wantRefusal(t, join("vjt1.bm90LWEtdG9rZW4", "spiffe://example.org/api"), connect.CodeUnauthenticated, "token_unknown")
	wantRefusal(t, join(e.token(t, "spiffe://example.org/api"), "spiffe://example.org/admin"), connect.CodePermissionDenied, "escalation")

	// A used token stays used after the CA restarts.
	e.stop()
	e2 := startCA(t, e.dir, "127.0.0.1:0")
	boot2 := e2.bootstrapClient(t)
	_, err = boot2.Join(ctx, connect.NewRequest(&cav1.JoinRequest{Token: tok, Csr: csrFor(t, "spiffe://example.org/ns/prod/sa/api")}))
	wantRefusal(t, err, connect.CodeUnauthenticated, "token_replayed")
	for reason, n := range map[string]float64{"token_replayed": 1, "token_expired": 1, "token_unknown": 1, "escalation": 1, "issued": 1} {
		if got := e.result(cav1connect.CAServiceJoinProcedure, reason); got != n {
			t.Errorf("veil_ca_requests_total{result=%q} = %v, want %v", reason, got, n)
		}
	}
	// Tokens are stored as hashes only.
	entries, err := os.ReadDir(filepath.Join(e.dir, "tokens"))
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range entries {
		b, _ := os.ReadFile(filepath.Join(e.dir, "tokens", ent.Name()))
		if strings.Contains(string(b), strings.TrimPrefix(tok, "vjt1.")) || strings.Contains(ent.Name(), strings.TrimPrefix(tok, "vjt1.")) {
			t.Fatal("a token is stored in the clear")
		}
		if fi, _ := ent.Info(); fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s mode %v", ent.Name(), fi.Mode().Perm())
		}
	}
}

func TestBadCSRs(t *testing.T) {
	e := startCA(t, newCADir(t), "127.0.0.1:0", ca.WithMaxTTL(time.Hour))
	boot := e.bootstrapClient(t)
	id := "spiffe://example.org/api"
	tampered := csrFor(t, id)
	tampered[len(tampered)-5] ^= 0xff
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	weakEC, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*neturl.URL{spiffeid.RequireFromString(id).URL()}}, p224)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	weakRSA, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*neturl.URL{spiffeid.RequireFromString(id).URL()}}, rsa1024)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	withDNS, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{"evil.example"}, URIs: []*neturl.URL{spiffeid.RequireFromString(id).URL()}}, key)
	for _, tc := range []struct {
		name   string
		csr    []byte
		ttl    uint32
		reason string
	}{
		{"unparseable", []byte("not a CSR"), 0, "bad_csr"},
		{"bad signature", tampered, 0, "bad_signature"},
		{"P-224 key", weakEC, 0, "weak_key"},
		{"RSA-1024 key", weakRSA, 0, "weak_key"},
		{"extra DNS SAN", withDNS, 0, "extra_sans"},
		{"two SPIFFE IDs", csrFor(t, id, "spiffe://example.org/other"), 0, "extra_sans"},
		{"no SPIFFE ID", csrFor(t), 0, "wrong_id"},
		{"other trust domain", csrFor(t, "spiffe://other.org/api"), 0, "wrong_id"},
		{"TTL over the maximum", csrFor(t, id), 7200, "bad_ttl"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := e.token(t, id)
			_, err := boot.Join(context.Background(), connect.NewRequest(&cav1.JoinRequest{Token: tok, Csr: tc.csr, TtlSeconds: tc.ttl}))
			wantRefusal(t, err, connect.CodeInvalidArgument, tc.reason)
			if !strings.HasPrefix(connectMessage(err), "ca: ") {
				t.Fatalf("message %q does not give the reason", connectMessage(err))
			}
			// A bad CSR does not burn the token.
			if _, err := boot.Join(context.Background(), connect.NewRequest(&cav1.JoinRequest{Token: tok, Csr: csrFor(t, id)})); err != nil {
				t.Fatalf("token unusable after a bad CSR: %v", err)
			}
		})
	}
}

func connectMessage(err error) string {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Message()
	}
	return ""
}

func TestRenewRefusals(t *testing.T) {
	e := startCA(t, newCADir(t), "127.0.0.1:0", ca.WithRateLimit(1e-6, 3))
	id := "spiffe://example.org/api"
	src := e.join(t, id, transport.WithCertTTL(time.Hour)) // 1 of the burst of 3
	cl := ca.NewClient(e.url, e.bundle(t), "")
	ctx := context.Background()

	_, err := cl.Renew(ctx, src, csrFor(t, "spiffe://example.org/admin"), 0)
	wantRefusal(t, err, connect.CodePermissionDenied, "escalation")

	if _, err := cl.Renew(ctx, src, csrFor(t, id), 0); err != nil { // 2
		t.Fatal(err)
	}
	if _, err := cl.Renew(ctx, src, csrFor(t, id), 0); err != nil { // 3
		t.Fatal(err)
	}
	_, err = cl.Renew(ctx, src, csrFor(t, id), 0)
	wantRefusal(t, err, connect.CodeResourceExhausted, "rate_limited")

	// Revoking the serial: the open connection is refused by the CA, a new one by the
	// TLS handshake (counted by reason).
	svid, _ := src.GetX509SVID()
	if _, err := pki.Revoke(e.dir, []string{svid.Certificates[0].SerialNumber.Text(16)}, nil); err != nil {
		t.Fatal(err)
	}
	_, err = cl.Renew(ctx, src, csrFor(t, id), 0)
	wantRefusal(t, err, connect.CodePermissionDenied, "revoked")
	fresh := ca.NewClient(e.url, e.bundle(t), "")
	_, err = fresh.Renew(ctx, src, csrFor(t, id), 0)
	if err == nil || connect.CodeOf(err) != connect.CodeUnavailable {
		t.Fatalf("renewal with a revoked certificate on a new connection: %v", err)
	}
	if got := handshakeFailures(t, e.reg, transport.ReasonRevoked); got < 1 {
		t.Fatalf("revoked handshakes counted %v", got)
	}
}

func TestExpiredCertificateRefused(t *testing.T) {
	e := startCA(t, newCADir(t), "127.0.0.1:0")
	c, err := pki.LoadCA(e.dir)
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://example.org/api")
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	// Three seconds: X.509 times have whole seconds, so a one-second lifetime can end
	// almost at once after truncation and fail the first (valid) call.
	chain, err := c.Issue(id, &key.PublicKey, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	src := transport.StaticSource{SVID: &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key},
		Bundles: x509bundle.NewSet(e.bundle(t))}
	// A connection opened while the certificate was valid outlives it: the CA checks
	// the certificate again on each renewal.
	open := ca.NewClient(e.url, e.bundle(t), "")
	if _, err := open.Trust(context.Background(), src); err != nil {
		t.Fatal(err)
	}
	for time.Now().Before(chain[0].NotAfter.Add(time.Second)) {
		time.Sleep(100 * time.Millisecond)
	}
	_, err = open.Renew(context.Background(), src, csrFor(t, id.String()), 0)
	wantRefusal(t, err, connect.CodeUnauthenticated, "expired_certificate")
	_, err = ca.NewClient(e.url, e.bundle(t), "").Renew(context.Background(), src, csrFor(t, id.String()), 0)
	if err == nil || connect.CodeOf(err) != connect.CodeUnavailable {
		t.Fatalf("renewal with an expired certificate: %v", err)
	}
	if got := handshakeFailures(t, e.reg, transport.ReasonExpired); got < 1 {
		t.Fatalf("expired handshakes counted %v", got)
	}
}

func handshakeFailures(t *testing.T, reg *prometheus.Registry, reason transport.Reason) float64 {
	t.Helper()
	return counter(reg, "veil_tls_handshake_failures_total", map[string]string{"reason": string(reason)})
}

// counter sums the counters called name whose labels include want.
func counter(reg *prometheus.Registry, name string, want map[string]string) float64 {
	mfs, err := reg.Gather()
	if err != nil {
		panic(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if labels[k] != v {
					continue next
				}
			}
			n += m.GetCounter().GetValue()
		}
	}
	return n
}

func TestJoinCertifiesPQStaticKey(t *testing.T) {
	e := startCA(t, newCADir(t), "127.0.0.1:0")
	boot := e.bootstrapClient(t)
	id := "spiffe://example.org/sealed"
	suite := pqkex.X25519MLKEM768()
	pub, _, err := pqkex.GenerateKey(suite, nil)
	if err != nil {
		t.Fatal(err)
	}
	tok := e.token(t, id)
	_, err = boot.Join(context.Background(), connect.NewRequest(&cav1.JoinRequest{Token: tok, Csr: csrFor(t, id), PqStaticKey: pub[:10]}))
	wantRefusal(t, err, connect.CodeInvalidArgument, "bad_pq_key")
	_, err = boot.Join(context.Background(), connect.NewRequest(&cav1.JoinRequest{Token: tok, Csr: csrFor(t, id), PqStaticKey: pub, PqSuite: "no-such-suite"}))
	wantRefusal(t, err, connect.CodeInvalidArgument, "bad_pq_key")
	res, err := boot.Join(context.Background(), connect.NewRequest(&cav1.JoinRequest{Token: tok, Csr: csrFor(t, id), PqStaticKey: pub}))
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(res.Msg.GetIssued().GetChain()[0])
	if err != nil {
		t.Fatal(err)
	}
	cred, err := pqkex.ParseCredential(res.Msg.GetIssued().GetPqCredential())
	if err != nil {
		t.Fatal(err)
	}
	if cred.SPIFFEID() != id || !cred.NotAfter().Equal(leaf.NotAfter) || !bytes.Equal(cred.PublicKey(), pub) {
		t.Fatalf("credential for %s until %s, certificate until %s", cred.SPIFFEID(), cred.NotAfter(), leaf.NotAfter)
	}
	root, err := pki.LoadCA(e.dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(res.Msg.GetIssued().GetPqRoot(), root.PQPublicKey().Bytes()) {
		t.Fatal("pq_root is not the CA's ML-DSA-65 key")
	}
	if err := (pqkex.Roots{PQ: root.PQPublicKey(), Classical: root.Root().PublicKey}).Verify(cred, time.Now()); err != nil {
		t.Fatalf("credential does not verify: %v", err)
	}
}

// TestWithMetrics: a Service given ca.WithMetrics counts its requests in that registry
// as well as in its server's, and one registry given to both is not an error.
func TestWithMetrics(t *testing.T) {
	own := prometheus.NewRegistry()
	e := startCA(t, newCADir(t), "127.0.0.1:0", ca.WithMetrics(own))
	boot := e.bootstrapClient(t)
	_, err := boot.Join(context.Background(), connect.NewRequest(&cav1.JoinRequest{Token: "vjt1.bm90LWEtdG9rZW4", Csr: csrFor(t, "spiffe://example.org/api")}))
	wantRefusal(t, err, connect.CodeUnauthenticated, "token_unknown")
	want := map[string]string{"procedure": cav1connect.CAServiceJoinProcedure, "result": "token_unknown"}
	if got := counter(own, "veil_ca_requests_total", want); got != 1 {
		t.Errorf("WithMetrics registry: veil_ca_requests_total = %v, want 1", got)
	}
	if got := e.result(cav1connect.CAServiceJoinProcedure, "token_unknown"); got != 1 {
		t.Errorf("server registry: veil_ca_requests_total = %v, want 1", got)
	}

	shared := prometheus.NewRegistry()
	svc, err := ca.New(e.dir, ca.WithMetrics(shared))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.NewServer(svc, nil, nil, rpc.WithMetrics(shared)); err != nil {
		t.Fatalf("NewServer with the registry given to WithMetrics: %v", err)
	}
	if _, err := ca.New(e.dir, ca.WithMetrics(shared)); err == nil {
		t.Error("a second Service registering in the same registry: no error")
	}
}
