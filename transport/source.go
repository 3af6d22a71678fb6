package transport

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/veilrpc/veil/internal/atomicfile"
	"github.com/veilrpc/veil/internal/certpem"
)

// Files of an identity directory, in the cert-manager Secret layout.
const (
	CertFile   = "tls.crt" // leaf certificate followed by its chain, PEM
	KeyFile    = "tls.key" // the leaf's private key, PKCS#8 PEM, mode 0600
	BundleFile = "ca.crt"  // trusted roots, PEM
)

// Source supplies the workload's own X.509-SVID and the trust bundles it verifies peers
// with. go-spiffe's workloadapi.X509Source satisfies it, as does FileSource.
type Source interface {
	x509svid.Source
	x509bundle.Source
}

// StaticSource is a Source over fixed material. A nil SVID or Bundles is an error when
// asked for, so the zero StaticSource fails every handshake.
type StaticSource struct {
	SVID    *x509svid.SVID
	Bundles *x509bundle.Set
}

// GetX509SVID returns the fixed SVID.
func (s StaticSource) GetX509SVID() (*x509svid.SVID, error) {
	if s.SVID == nil {
		return nil, errors.New("transport: no SVID")
	}
	return s.SVID, nil
}

// GetX509BundleForTrustDomain returns the bundle for td.
func (s StaticSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if s.Bundles == nil {
		return nil, fmt.Errorf("transport: no bundle for trust domain %q", td)
	}
	return s.Bundles.GetX509BundleForTrustDomain(td)
}

// FileSource reads an identity directory in the cert-manager Secret layout: tls.crt
// (leaf and chain), tls.key and ca.crt. The roots in ca.crt are trusted for the leaf's
// own trust domain. Reload swaps in new files atomically; a pair that does not match
// never replaces the current one. Make one with LoadFiles or WatchFiles: the zero
// FileSource has no identity and trusts nothing, so every handshake with it fails.
type FileSource struct {
	dir   string
	cur   atomic.Pointer[StaticSource]
	watch *watchState // set by WatchFiles
}

// LoadFiles reads the identity in dir.
func LoadFiles(dir string) (*FileSource, error) {
	s := &FileSource{dir: dir}
	if err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the directory again. On any error the current identity stays in use.
func (s *FileSource) Reload() error {
	m, err := readIdentity(s.dir)
	if err != nil {
		return err
	}
	s.cur.Store(m)
	return nil
}

// GetX509SVID returns the current SVID.
func (s *FileSource) GetX509SVID() (*x509svid.SVID, error) { return s.current().GetX509SVID() }

// GetX509BundleForTrustDomain returns the current bundle for td.
func (s *FileSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.current().GetX509BundleForTrustDomain(td)
}

// current is the material in use; a FileSource that never loaded any (the zero value)
// has no SVID and no bundle.
func (s *FileSource) current() StaticSource {
	if m := s.cur.Load(); m != nil {
		return *m
	}
	return StaticSource{}
}

func readIdentity(dir string) (*StaticSource, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CertFile))
	if err != nil {
		return nil, fmt.Errorf("transport: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, KeyFile))
	if err != nil {
		return nil, fmt.Errorf("transport: %w", err)
	}
	bundlePEM, err := os.ReadFile(filepath.Join(dir, BundleFile))
	if err != nil {
		return nil, fmt.Errorf("transport: %w", err)
	}
	svid, err := x509svid.Parse(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("transport: %s: %w", dir, err)
	}
	roots, err := certpem.ParseCertificates(bundlePEM)
	if err != nil {
		return nil, fmt.Errorf("transport: %s: %w", BundleFile, err)
	}
	for _, r := range roots {
		if !r.IsCA {
			return nil, fmt.Errorf("transport: %s: %q is not a CA certificate", BundleFile, r.Subject)
		}
	}
	bundle := x509bundle.FromX509Authorities(svid.ID.TrustDomain(), roots)
	if _, _, err := x509svid.Verify(svid.Certificates, bundle); err != nil {
		return nil, fmt.Errorf("transport: %s does not chain to %s: %w", CertFile, BundleFile, err)
	}
	return &StaticSource{SVID: svid, Bundles: x509bundle.NewSet(bundle)}, nil
}

// WriteIdentity writes an identity directory that LoadFiles and WatchFiles read: chain
// to tls.crt, key to tls.key (0600), roots to ca.crt; dir is created 0700 if missing.
// Each file is replaced atomically; the key is written first so that a watcher never
// pairs a new certificate with an old key for long.
func WriteIdentity(dir string, chain []*x509.Certificate, key crypto.Signer, roots []*x509.Certificate) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("transport: %w", err)
	}
	keyPEM, err := certpem.EncodePrivateKey(key)
	if err != nil {
		return fmt.Errorf("transport: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, KeyFile), keyPEM, 0o600); err != nil {
		return fmt.Errorf("transport: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, CertFile), certpem.EncodeCertificates(chain), 0o644); err != nil {
		return fmt.Errorf("transport: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, BundleFile), certpem.EncodeCertificates(roots), 0o644); err != nil {
		return fmt.Errorf("transport: %w", err)
	}
	return nil
}
