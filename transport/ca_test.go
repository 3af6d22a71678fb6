package transport

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
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
	fi, err := os.Stat(filepath.Join(dir, "echo", KeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("tls.key: %v %v", fi, err)
	}
	src, err := LoadFiles(filepath.Join(dir, "echo"))
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

func TestLoadFilesRefusesMismatchedPair(t *testing.T) {
	ca := newTestCA(t, "example.org")
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, d := range []string{a, b} {
		if err := ca.IssueFiles(spiffeid.RequireFromString("spiffe://example.org/x"), d, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	src, err := LoadFiles(a)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := src.GetX509SVID()
	key, _ := os.ReadFile(filepath.Join(b, KeyFile))
	if err := os.WriteFile(filepath.Join(a, KeyFile), key, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := src.Reload(); err == nil {
		t.Fatal("reload accepted a key that does not match the certificate")
	}
	after, _ := src.GetX509SVID()
	if after != before {
		t.Fatal("a failed reload replaced the identity")
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
