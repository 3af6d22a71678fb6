package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/veilrpc/veil/transport"
)

func TestCAFilesRoundTrip(t *testing.T) {
	dir := t.TempDir()
	ca, err := InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := InitCA(filepath.Join(dir, "ca"), "example.org"); err == nil {
		t.Fatal("InitCA overwrote an existing CA")
	}
	for _, f := range []string{caKeyFile, caPQKeyFile} {
		fi, err := os.Stat(filepath.Join(dir, "ca", f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	loaded, err := LoadCA(filepath.Join(dir, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Root().Equal(ca.Root()) || loaded.TrustDomain() != ca.TrustDomain() {
		t.Fatal("loaded CA differs")
	}
	if !loaded.PQPublicKey().Equal(ca.PQPublicKey()) {
		t.Fatal("ML-DSA-65 key differs after reload")
	}
	msg := []byte("credential")
	sig, err := loaded.PQSigner().Sign(rand.Reader, msg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !mldsa65.Verify(ca.PQPublicKey(), msg, nil, sig) {
		t.Fatal("ML-DSA-65 signature from the reloaded key does not verify")
	}

	id := spiffeid.RequireFromString("spiffe://example.org/echo")
	if err := loaded.IssueFiles(id, filepath.Join(dir, "echo"), time.Hour); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, "echo", transport.KeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("tls.key: %v %v", fi, err)
	}
	src, err := transport.LoadFiles(filepath.Join(dir, "echo"))
	if err != nil {
		t.Fatal(err)
	}
	svid, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	leaf := svid.Certificates[0]
	if svid.ID != id || len(leaf.URIs) != 1 || leaf.IsCA {
		t.Fatalf("leaf: id %v uris %v ca %v", svid.ID, leaf.URIs, leaf.IsCA)
	}
	if !hasEKU(leaf, x509.ExtKeyUsageServerAuth) || !hasEKU(leaf, x509.ExtKeyUsageClientAuth) {
		t.Fatalf("leaf EKUs %v", leaf.ExtKeyUsage)
	}
	if d := leaf.NotAfter.Sub(leaf.NotBefore); d < time.Hour || d > time.Hour+2*time.Minute {
		t.Fatalf("lifetime %s", d)
	}
}

func TestIssueRefuses(t *testing.T) {
	ca := newTestCA(t, "example.org")
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := ca.Issue(spiffeid.RequireFromString("spiffe://other.org/x"), &key.PublicKey, time.Hour); err == nil {
		t.Error("issued an ID outside the trust domain")
	}
	if _, err := ca.Issue(spiffeid.RequireFromString("spiffe://example.org/x"), &key.PublicKey, MaxLeafTTL+time.Hour); err == nil {
		t.Error("issued beyond the maximum TTL")
	}
}

func hasEKU(c *x509.Certificate, u x509.ExtKeyUsage) bool {
	for _, e := range c.ExtKeyUsage {
		if e == u {
			return true
		}
	}
	return false
}

func newTestCA(t *testing.T, td string) *CA {
	t.Helper()
	ca, err := InitCA(t.TempDir(), td)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// testSource issues a leaf for id and returns it as a transport.Source that trusts the
// CA's root.
func (c *CA) testSource(t *testing.T, id string, ttl time.Duration) transport.StaticSource {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := c.Issue(spiffeid.RequireFromString(id), &key.PublicKey, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return transport.StaticSource{
		SVID:    &x509svid.SVID{ID: spiffeid.RequireFromString(id), Certificates: chain, PrivateKey: key},
		Bundles: x509bundle.NewSet(x509bundle.FromX509Authorities(c.td, []*x509.Certificate{c.cert})),
	}
}

// handshake runs one mutual-TLS 1.3 handshake on loopback with transport's configs over
// server and client, and returns the first side's error.
func handshake(t *testing.T, server, client transport.Source) error {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", transport.ServerConfig(server))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	errc := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			errc <- err
			return
		}
		defer conn.Close()
		errc <- conn.(*tls.Conn).Handshake()
	}()
	conn, err := tls.Dial("tcp", ln.Addr().String(), transport.ClientConfig(client, transport.WithAuthorizer(transport.AuthorizeAny())))
	if err != nil {
		return err
	}
	defer conn.Close()
	// In TLS 1.3 the server verifies the client's certificate after the client's side
	// of the handshake has ended.
	return <-errc
}
