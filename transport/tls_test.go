package transport

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	neturl "net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// recorder is an Observer that remembers what it saw.
type recorder struct {
	mu      sync.Mutex
	groups  []tls.CurveID
	resumed int
	reasons []Reason
}

func (r *recorder) HandshakeDone(g tls.CurveID, resumed bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.groups = append(r.groups, g)
	if resumed {
		r.resumed++
	}
}

func (r *recorder) HandshakeFailed(reason Reason) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reasons = append(r.reasons, reason)
}

func (r *recorder) lastReason() Reason {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.reasons) == 0 {
		return ""
	}
	return r.reasons[len(r.reasons)-1]
}

// testCA is a minimal certificate authority for these tests: a self-signed root that
// signs leaves itself. Package pki, Veil's CA, builds on this package, so the tests
// here cannot use it.
type testCA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, td string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c := &testCA{td: spiffeid.RequireTrustDomainFromString(td), key: key}
	tmpl := &x509.Certificate{
		SerialNumber: testSerial(), Subject: pkix.Name{CommonName: "test root " + td},
		URIs: []*neturl.URL{c.td.ID().URL()}, NotBefore: time.Now().Add(-5 * time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	if c.cert, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	return c
}

func testSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}

// sign signs a leaf template over pub, for certificates the real CA would never issue
// as well as for the ones it would.
func (c *testCA) sign(tmpl *x509.Certificate, pub any) (*x509.Certificate, error) {
	tmpl.SerialNumber = testSerial()
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, pub, c.key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// Issue signs a leaf for id over pub, valid for ttl, as package pki's CA does.
func (c *testCA) Issue(id spiffeid.ID, pub any, ttl time.Duration) ([]*x509.Certificate, error) {
	leaf, err := c.sign(&x509.Certificate{URIs: []*neturl.URL{id.URL()}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(ttl)}, pub)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{leaf}, nil
}

// IssueFiles issues a leaf for id and writes it with a new key into dir.
func (c *testCA) IssueFiles(id spiffeid.ID, dir string, ttl time.Duration) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	chain, err := c.Issue(id, &key.PublicKey, ttl)
	if err != nil {
		return err
	}
	return WriteIdentity(dir, chain, key, c.Bundle())
}

// Bundle is the CA's trusted roots.
func (c *testCA) Bundle() []*x509.Certificate { return []*x509.Certificate{c.cert} }

func (c *testCA) testSource(t *testing.T, id string, ttl time.Duration) StaticSource {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := c.Issue(spiffeid.RequireFromString(id), &key.PublicKey, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return StaticSource{
		SVID:    &x509svid.SVID{ID: spiffeid.RequireFromString(id), Certificates: chain, PrivateKey: key},
		Bundles: x509bundle.NewSet(x509bundle.FromX509Authorities(c.td, c.Bundle())),
	}
}

// craftedSource signs an arbitrary leaf template with the CA's key, for certificates
// a CA would never issue.
func (c *testCA) craftedSource(t *testing.T, tmpl *x509.Certificate) StaticSource {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := c.sign(tmpl, &key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return StaticSource{
		// The SVID type is only a carrier here: certificateFrom reads its fields.
		SVID:    &x509svid.SVID{Certificates: []*x509.Certificate{leaf}, PrivateKey: key},
		Bundles: x509bundle.NewSet(x509bundle.FromX509Authorities(c.td, c.Bundle())),
	}
}

// serve accepts TLS connections with cfg and answers "ok" after each handshake.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				if err := conn.(*tls.Conn).Handshake(); err != nil {
					return
				}
				_, _ = conn.Write([]byte("ok"))
			}()
		}
	}()
	return ln.Addr().String()
}

// dial handshakes and reads the server's "ok": TLS 1.3 client certificates are
// checked after the client's side of the handshake ends, so a refusal shows on read.
func dial(addr string, cfg *tls.Config) (tls.ConnectionState, error) {
	d := tls.Dialer{Config: cfg}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(conn, buf); err != nil {
		return tls.ConnectionState{}, err
	}
	return conn.(*tls.Conn).ConnectionState(), nil
}

func TestMutualTLSNegotiatesHybridGroup(t *testing.T) {
	ca := newTestCA(t, "example.org")
	server := ca.testSource(t, "spiffe://example.org/server", time.Hour)
	client := ca.testSource(t, "spiffe://example.org/client", time.Hour)
	var srvObs, cliObs recorder
	addr := serve(t, ServerConfig(server, WithObserver(&srvObs)))
	cfg := ClientConfig(client, WithObserver(&cliObs), WithAuthorizer(AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/server"))))
	cs, err := dial(addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if cs.Version != tls.VersionTLS13 || cs.CurveID != tls.X25519MLKEM768 {
		t.Fatalf("version %x group %s, want TLS 1.3 with X25519MLKEM768", cs.Version, cs.CurveID)
	}
	id, err := PeerID(&cs)
	if err != nil || id.String() != "spiffe://example.org/server" {
		t.Fatalf("peer ID = %v, %v", id, err)
	}
	// A second connection resumes with a session ticket and is verified again.
	cs, err = dial(addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !cs.DidResume {
		t.Fatal("second connection did not resume")
	}
	srvObs.mu.Lock()
	defer srvObs.mu.Unlock()
	if len(srvObs.groups) != 2 || srvObs.resumed != 1 || len(srvObs.reasons) != 0 {
		t.Fatalf("server observed groups %v resumed %d reasons %v", srvObs.groups, srvObs.resumed, srvObs.reasons)
	}
}

func TestServerRefuses(t *testing.T) {
	ca := newTestCA(t, "example.org")
	other := newTestCA(t, "example.org")
	server := ca.testSource(t, "spiffe://example.org/server", time.Hour)
	good := ca.testSource(t, "spiffe://example.org/client", time.Hour)
	now := time.Now()
	twoIDs := ca.craftedSource(t, &x509.Certificate{
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		URIs: []*neturl.URL{spiffeid.RequireFromString("spiffe://example.org/a").URL(), spiffeid.RequireFromString("spiffe://example.org/b").URL()},
	})
	noID := ca.craftedSource(t, &x509.Certificate{
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		Subject: pkix.Name{CommonName: "client"}, DNSNames: []string{"client.example.org"},
	})
	expired := ca.craftedSource(t, &x509.Certificate{
		NotBefore: now.Add(-2 * time.Hour), NotAfter: now.Add(-time.Hour),
		URIs: []*neturl.URL{spiffeid.RequireFromString("spiffe://example.org/client").URL()},
	})
	noCert := StaticSource{Bundles: good.Bundles}
	anyID := WithAuthorizer(AuthorizeAny())

	cases := []struct {
		name   string
		client *tls.Config
		mode   PQMode
		reason Reason
	}{
		{"no client certificate", clientWithout(ClientConfig(noCert, anyID)), PQPermissive, ReasonNoClientCert},
		{"certificate from another CA", ClientConfig(StaticSource{SVID: other.testSource(t, "spiffe://example.org/client", time.Hour).SVID, Bundles: good.Bundles}, anyID), PQPermissive, ReasonUnknownAuthority},
		{"expired certificate", ClientConfig(expired, anyID), PQPermissive, ReasonExpired},
		{"no SPIFFE ID", ClientConfig(noID, anyID), PQPermissive, ReasonNoSPIFFEID},
		{"two SPIFFE IDs", ClientConfig(twoIDs, anyID), PQPermissive, ReasonManySPIFFEIDs},
		{"TLS 1.2", tls12(ClientConfig(good, anyID)), PQPermissive, ReasonTLSVersion},
		{"classic-only ClientHello under PQ strict", classicOnly(ClientConfig(good, anyID)), PQStrict, ReasonClassicOnly},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var obs recorder
			addr := serve(t, ServerConfig(server, WithObserver(&obs), WithPQMode(tc.mode)))
			if _, err := dial(addr, tc.client); err == nil {
				t.Fatal("handshake succeeded")
			}
			if got := obs.lastReason(); got != tc.reason {
				t.Fatalf("reason = %q, want %q", got, tc.reason)
			}
		})
	}
}

func TestPermissiveAcceptsClassicAndReportsIt(t *testing.T) {
	ca := newTestCA(t, "example.org")
	var obs recorder
	addr := serve(t, ServerConfig(ca.testSource(t, "spiffe://example.org/server", time.Hour), WithObserver(&obs), WithPQMode(PQPermissive)))
	cs, err := dial(addr, classicOnly(ClientConfig(ca.testSource(t, "spiffe://example.org/client", time.Hour),
		WithPQMode(PQPermissive), WithAuthorizer(AuthorizeAny()))))
	if err != nil {
		t.Fatal(err)
	}
	if cs.CurveID != tls.X25519 {
		t.Fatalf("group %s, want X25519", cs.CurveID)
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if len(obs.groups) != 1 || IsPQGroup(obs.groups[0]) {
		t.Fatalf("observed %v", obs.groups)
	}
}

// TestZeroConfigIsSafe: with no options, a server accepts only post-quantum hybrid
// key exchange, and a client accepts no server until WithAuthorizer names one.
func TestZeroConfigIsSafe(t *testing.T) {
	if m, err := ParsePQMode(""); m != PQStrict || err != nil || PQMode(0) != PQStrict || PQMode(0).String() != "strict" {
		t.Fatalf("zero PQMode: ParsePQMode(\"\") = %v, %v; PQMode(0) = %v", m, err, PQMode(0))
	}
	ca := newTestCA(t, "example.org")
	var obs recorder
	addr := serve(t, ServerConfig(ca.testSource(t, "spiffe://example.org/server", time.Hour), WithObserver(&obs)))
	client := ca.testSource(t, "spiffe://example.org/client", time.Hour)
	if _, err := dial(addr, classicOnly(ClientConfig(client, WithAuthorizer(AuthorizeAny()), WithPQMode(PQPermissive)))); err == nil {
		t.Fatal("a default server accepted a classic-only ClientHello")
	}
	if got := obs.lastReason(); got != ReasonClassicOnly {
		t.Fatalf("reason = %q, want %q", got, ReasonClassicOnly)
	}
	_, err := dial(addr, ClientConfig(client))
	var he *HandshakeError
	if !errors.As(err, &he) || he.Reason != ReasonUnauthorizedPeer {
		t.Fatalf("a client without an Authorizer: %v, want it to refuse the server", err)
	}
	if _, err := dial(addr, ClientConfig(client, WithAuthorizer(nil))); !errors.As(err, &he) || he.Reason != ReasonUnauthorizedPeer {
		t.Fatalf("WithAuthorizer(nil): %v, want the default (refuse)", err)
	}
	// A default client does negotiate the hybrid group with a default server.
	if cs, err := dial(addr, ClientConfig(client, WithAuthorizer(AuthorizeAny()))); err != nil || cs.CurveID != tls.X25519MLKEM768 {
		t.Fatalf("default peers: %v, group %s", err, cs.CurveID)
	}
}

func TestClientRefusesUnauthorizedServer(t *testing.T) {
	ca := newTestCA(t, "example.org")
	addr := serve(t, ServerConfig(ca.testSource(t, "spiffe://example.org/impostor", time.Hour)))
	var obs recorder
	cfg := ClientConfig(ca.testSource(t, "spiffe://example.org/client", time.Hour),
		WithObserver(&obs), WithAuthorizer(AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/server"))))
	_, err := dial(addr, cfg)
	var he *HandshakeError
	if !errors.As(err, &he) || he.Reason != ReasonUnauthorizedPeer {
		t.Fatalf("err = %v, want unauthorized peer", err)
	}
	if !strings.Contains(err.Error(), "impostor") {
		t.Fatalf("error does not name the peer: %v", err)
	}
}

func TestPlaintextClientIsRefused(t *testing.T) {
	ca := newTestCA(t, "example.org")
	addr := serve(t, ServerConfig(ca.testSource(t, "spiffe://example.org/server", time.Hour)))
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, _ = conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(conn)
	if strings.Contains(string(b), "ok") {
		t.Fatalf("plaintext client got an answer: %q", b)
	}
}

func clientWithout(cfg *tls.Config) *tls.Config {
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
	return cfg
}

func tls12(cfg *tls.Config) *tls.Config {
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	return cfg
}

func classicOnly(cfg *tls.Config) *tls.Config {
	cfg.CurvePreferences = []tls.CurveID{tls.X25519}
	return cfg
}

func TestPattern(t *testing.T) {
	cases := []struct {
		pattern, id string
		want        bool
	}{
		{"spiffe://company.com/payment/ns/*/sa/*", "spiffe://company.com/payment/ns/prod/sa/api", true},
		{"spiffe://company.com/payment/ns/*/sa/*", "spiffe://company.com/payment/ns/prod/sa", false},
		{"spiffe://company.com/payment/ns/*/sa/*", "spiffe://company.com/payment/ns/prod/sa/api/x", false},
		{"spiffe://company.com/payment/ns/*/sa/*", "spiffe://other.com/payment/ns/prod/sa/api", false},
		{"spiffe://company.com", "spiffe://company.com/anything/at/all", true},
		{"spiffe://company.com", "spiffe://company.org/x", false},
		{"spiffe://company.com/echo", "spiffe://company.com/echo", true},
		{"spiffe://company.com/echo", "spiffe://company.com/echo2", false},
		{"*", "spiffe://x.org/y", true},
	}
	for _, tc := range cases {
		p, err := ParsePattern(tc.pattern)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.Match(spiffeid.RequireFromString(tc.id)); got != tc.want {
			t.Errorf("%s matches %s = %v, want %v", tc.pattern, tc.id, got, tc.want)
		}
	}
	for _, bad := range []string{"http://x/y", "spiffe://", "spiffe://x/a*b", "spiffe://x//y", "spiffe://X Y/z"} {
		if _, err := ParsePattern(bad); err == nil {
			t.Errorf("ParsePattern(%q) succeeded", bad)
		}
	}
}
