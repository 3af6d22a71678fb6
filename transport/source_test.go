package transport

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

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

// TestZeroSourcesFail: the zero FileSource and StaticSource have no identity and trust
// nothing; asking them fails instead of panicking.
func TestZeroSourcesFail(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	for name, src := range map[string]Source{"FileSource": &FileSource{}, "StaticSource": StaticSource{}} {
		if _, err := src.GetX509SVID(); err == nil {
			t.Errorf("zero %s has an SVID", name)
		}
		if _, err := src.GetX509BundleForTrustDomain(td); err == nil {
			t.Errorf("zero %s has a bundle", name)
		}
	}
}
