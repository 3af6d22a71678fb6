package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/veilrpc/veil/internal/certpem"
)

// Files of an intermediate CA in a CA directory.
const (
	caInterCertFile = "intermediate.crt"
	caInterKeyFile  = "intermediate.key" // 0600
)

// DefaultIntermediateTTL is the lifetime of an intermediate created without one.
const DefaultIntermediateTTL = 365 * 24 * time.Hour

// CreateIntermediate creates (or replaces) an intermediate CA in dir, signed by the
// root, valid for ttl (DefaultIntermediateTTL if zero, never past the root). From then
// on leaves are signed by the intermediate and carry it in their chain; workloads
// still trust only the roots. A root rotation re-creates it under the new root.
func CreateIntermediate(dir string, ttl time.Duration) (*x509.Certificate, error) {
	c, unlock, err := loadLocked(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if ttl == 0 {
		ttl = DefaultIntermediateTTL
	}
	if ttl < 0 {
		return nil, errors.New("pki: negative TTL")
	}
	return writeIntermediate(dir, c.cert, c.key, time.Now().Add(ttl))
}

func writeIntermediate(dir string, root *x509.Certificate, rootKey *ecdsa.PrivateKey, notAfter time.Time) (*x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	if notAfter.After(root.NotAfter) {
		notAfter = root.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(),
		Subject:               pkix.Name{Organization: []string{"Veil"}, CommonName: "Veil intermediate CA"},
		URIs:                  root.URIs[:1:1],
		NotBefore:             time.Now().Add(-5 * time.Minute),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true, // it signs leaves only
		SubjectKeyId:          keyID(&key.PublicKey),
		AuthorityKeyId:        root.SubjectKeyId,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root, &key.PublicKey, rootKey)
	if err != nil {
		return nil, fmt.Errorf("pki: intermediate certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	if err := writeKeyPair(dir, caInterKeyFile, caInterCertFile, key, cert); err != nil {
		return nil, err
	}
	return cert, nil
}

// renewIntermediate re-creates an existing intermediate under a new root, with the
// same lifetime left.
func renewIntermediate(dir string, root *x509.Certificate, rootKey *ecdsa.PrivateKey) error {
	b, err := os.ReadFile(filepath.Join(dir, caInterCertFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	certs, err := certpem.ParseCertificates(b)
	if err != nil {
		return fmt.Errorf("pki: %s: %w", caInterCertFile, err)
	}
	if certs[0].CheckSignatureFrom(root) == nil {
		return nil
	}
	_, err = writeIntermediate(dir, root, rootKey, certs[0].NotAfter)
	return err
}

// loadIntermediate reads the intermediate, if any. One that the signing root did not
// sign (a rotation interrupted before it was re-created) is an error, not ignored.
func (c *CA) loadIntermediate() error {
	certPEM, err := os.ReadFile(filepath.Join(c.dir, caInterCertFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	certs, err := certpem.ParseCertificates(certPEM)
	if err != nil || len(certs) != 1 || !certs[0].IsCA {
		return fmt.Errorf("pki: %s: want one CA certificate", caInterCertFile)
	}
	if err := certs[0].CheckSignatureFrom(c.cert); err != nil {
		return fmt.Errorf("pki: %s is not signed by %s (finish the root rotation's activate step): %w", caInterCertFile, caCertFile, err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(c.dir, caInterKeyFile))
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	signer, err := certpem.ParsePrivateKey(keyPEM)
	if err != nil {
		return fmt.Errorf("pki: %s: %w", caInterKeyFile, err)
	}
	key, ok := signer.(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(certs[0].PublicKey) {
		return fmt.Errorf("pki: %s does not match %s", caInterKeyFile, caInterCertFile)
	}
	c.inter, c.interKey = certs[0], key
	return nil
}

// Intermediate is the intermediate that signs leaves, or nil if the root signs them.
func (c *CA) Intermediate() *x509.Certificate { return c.inter }
