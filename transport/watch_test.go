package transport

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/internal/certpem"
)

// TestWatchFiles replaces an identity directory in every way cert-manager and kubelet
// do, and in ways they should not (half-written files, a certificate without its key),
// while clients handshake continuously: no handshake may fail, bad material never goes
// live, and good material does.
func TestWatchFiles(t *testing.T) {
	ca := newTestCA(t, "example.org")
	id := spiffeid.RequireFromString("spiffe://example.org/server")
	dir := t.TempDir()
	if err := ca.IssueFiles(id, dir, time.Hour); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	src, err := WatchFiles(ctx, dir, WithPollInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, ServerConfig(src))
	client := ca.testSource(t, "spiffe://example.org/client", time.Hour)
	cfg := ClientConfig(client, WithAuthorizer(AuthorizeID(id)))
	cfg.ClientSessionCache = nil // a full handshake each time, with the server's current leaf

	var handshakes, failures atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				handshakes.Add(1)
				if _, err := dial(addr, cfg); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
			}
		}()
	}
	serial := func() string {
		s, _ := src.GetX509SVID()
		return s.Certificates[0].SerialNumber.Text(16)
	}
	serialOf := func(path string) string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		certs, err := certpem.ParseCertificates(b)
		if err != nil {
			t.Fatal(err)
		}
		return certs[0].SerialNumber.Text(16)
	}
	waitRejected := func(n uint64) {
		t.Helper()
		waitUntil(t, 5*time.Second, func() bool { return src.Status().Rejected >= n })
	}
	next := t.TempDir()

	// 1. A half-written certificate (a non-atomic writer caught mid-write).
	orig := serial()
	if err := ca.IssueFiles(id, next, time.Hour); err != nil {
		t.Fatal(err)
	}
	full, _ := os.ReadFile(filepath.Join(next, CertFile))
	if err := os.WriteFile(filepath.Join(dir, CertFile), full[:len(full)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	waitRejected(1)
	if serial() != orig {
		t.Fatal("a half-written certificate went live")
	}
	// 2. The rest of the certificate arrives, but the key is still the old one.
	if err := os.WriteFile(filepath.Join(dir, CertFile), full, 0o644); err != nil {
		t.Fatal(err)
	}
	waitRejected(2)
	if serial() != orig {
		t.Fatal("a certificate that does not match the key went live")
	}
	// 3. The key arrives, half first.
	key, _ := os.ReadFile(filepath.Join(next, KeyFile))
	if err := os.WriteFile(filepath.Join(dir, KeyFile), key[:len(key)/3], 0o600); err != nil {
		t.Fatal(err)
	}
	waitRejected(3)
	if err := os.WriteFile(filepath.Join(dir, KeyFile), key, 0o600); err != nil {
		t.Fatal(err)
	}
	want := serialOf(filepath.Join(next, CertFile))
	waitUntil(t, 5*time.Second, func() bool { return serial() == want })

	// 4. Kubernetes' atomic update: timestamped directories behind a ..data symlink.
	k8s := t.TempDir()
	gen := func(name string) string {
		d := filepath.Join(k8s, name)
		if err := ca.IssueFiles(id, d, time.Hour); err != nil {
			t.Fatal(err)
		}
		return serialOf(filepath.Join(d, CertFile))
	}
	gen("..2026_11_29_a")
	if err := os.Symlink("..2026_11_29_a", filepath.Join(k8s, "..data")); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{CertFile, KeyFile, BundleFile} {
		if err := os.Symlink(filepath.Join("..data", f), filepath.Join(k8s, f)); err != nil {
			t.Fatal(err)
		}
	}
	ksrc, err := WatchFiles(ctx, k8s, WithPollInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	want = gen("..2026_11_29_b")
	if err := os.Symlink("..2026_11_29_b", filepath.Join(k8s, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(k8s, "..data_tmp"), filepath.Join(k8s, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(k8s, "..2026_11_29_a")); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, func() bool {
		s, _ := ksrc.GetX509SVID()
		return s.Certificates[0].SerialNumber.Text(16) == want
	})
	if st := ksrc.Status(); st.Reloads != 1 || st.Rejected != 0 {
		t.Fatalf("symlink swap: %+v", st)
	}

	close(stop)
	wg.Wait()
	if failures.Load() != 0 {
		t.Fatalf("%d of %d handshakes failed; first: %v", failures.Load(), handshakes.Load(), firstErr.Load())
	}
	if st := src.Status(); st.Reloads != 1 || st.Rejected < 3 || st.LastError != "" {
		t.Fatalf("status %+v", st)
	}
	t.Logf("%d handshakes, 0 failed; %+v", handshakes.Load(), src.Status())
}

// TestWatchFilesPolls picks up a change without notifications, by polling.
func TestWatchFilesPolls(t *testing.T) {
	ca := newTestCA(t, "example.org")
	id := spiffeid.RequireFromString("spiffe://example.org/w")
	dir := t.TempDir()
	if err := ca.IssueFiles(id, dir, time.Hour); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	src, err := WatchFiles(ctx, dir, WithPollInterval(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	chain, _ := ca.Issue(id, &key.PublicKey, time.Hour)
	if err := WriteIdentity(dir, chain, key, []*x509.Certificate{ca.cert}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, func() bool {
		s, _ := src.GetX509SVID()
		return s.Certificates[0].Equal(chain[0])
	})
	cancel()
	if _, err := WatchFiles(context.Background(), filepath.Join(dir, "missing")); err == nil {
		t.Fatal("watching a missing directory succeeded")
	}
}
