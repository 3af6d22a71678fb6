package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	neturl "net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/emmansun/gmsm/sm2"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/internal/atomicfile"
	"github.com/veilrpc/veil/internal/certpem"
	"github.com/veilrpc/veil/transport"
)

// Files in a CA directory. Keys are written 0600, atomically.
const (
	caCertFile  = "root.crt"
	caKeyFile   = "root.key"
	caPQKeyFile = "root-mldsa65.key"
	caPQPubFile = "root-mldsa65.pub"
)

// DefaultLeafTTL is the lifetime of leaves issued without an explicit TTL.
const DefaultLeafTTL = 24 * time.Hour

// MaxLeafTTL is the longest leaf lifetime the CA issues.
const MaxLeafTTL = 90 * 24 * time.Hour

// CA is a SPIFFE certificate authority for one trust domain: an ECDSA P-256 root for
// X.509, and an ML-DSA-65 key that certifies post-quantum identity credentials. Make
// one with InitCA or LoadCA; the zero CA is not usable.
type CA struct {
	td    spiffeid.TrustDomain
	cert  *x509.Certificate
	key   *ecdsa.PrivateKey
	pqKey *mldsa65.PrivateKey
	pqPub *mldsa65.PublicKey
	now   func() time.Time

	sm2Key *sm2.PrivateKey // signs ShangMi sealing credentials (sm2.go); nil when none

	dir      string              // where the CA's files are; "" for a CA not on disk
	bundle   []*x509.Certificate // trusted roots: the signing root, plus one more during a rotation
	next     *x509.Certificate   // a prepared root not yet signing (rotation)
	denylist *Denylist
	inter    *x509.Certificate // intermediate that signs leaves, if any (see CreateIntermediate)
	interKey *ecdsa.PrivateKey
	stamp    string // fingerprint of the files read, to notice changes (Stale)
	seq      uint64 // Sequence of the files read
}

// InitCA creates a new CA in dir (created 0700 if missing) for trustDomain. It refuses
// to overwrite an existing CA.
func InitCA(dir string, trustDomain string) (*CA, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, fmt.Errorf("pki: trust domain: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, caKeyFile)); err == nil {
		return nil, fmt.Errorf("pki: a CA already exists in %s", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: root key: %w", err)
	}
	cert, der, err := newRoot(td, key, "Veil root CA "+td.Name())
	if err != nil {
		return nil, err
	}
	pqPub, pqKey, err := mldsa65.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: ML-DSA-65 key: %w", err)
	}
	keyPEM, err := certpem.EncodePrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	writes := []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{caKeyFile, keyPEM, 0o600},
		{caPQKeyFile, pem.EncodeToMemory(&pem.Block{Type: "ML-DSA-65 SEED", Bytes: pqKey.Seed()}), 0o600},
		{caPQPubFile, pem.EncodeToMemory(&pem.Block{Type: "ML-DSA-65 PUBLIC KEY", Bytes: pqPub.Bytes()}), 0o644},
		{caCertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644},
		{caBundleFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644},
	}
	for _, w := range writes {
		if err := atomicfile.Write(filepath.Join(dir, w.name), w.data, w.perm); err != nil {
			return nil, fmt.Errorf("pki: %w", err)
		}
	}
	ca := newCA(td, cert, key, pqKey, pqPub)
	ca.dir = dir
	ca.stamp, ca.seq = stampOf(dir), sequenceOf(dir)
	return ca, nil
}

// LoadCA reads a CA written by InitCA, with its trust bundle, prepared rotation and
// denylist if any.
func LoadCA(dir string) (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, caCertFile))
	if err != nil {
		return nil, fmt.Errorf("pki: no CA in %s: %w", dir, err)
	}
	certs, err := certpem.ParseCertificates(certPEM)
	if err != nil || len(certs) != 1 {
		return nil, fmt.Errorf("pki: %s: want one certificate", caCertFile)
	}
	cert := certs[0]
	if len(cert.URIs) != 1 {
		return nil, fmt.Errorf("pki: %s: root has no trust domain URI", caCertFile)
	}
	td, err := spiffeid.TrustDomainFromURI(cert.URIs[0])
	if err != nil {
		return nil, fmt.Errorf("pki: %s: %w", caCertFile, err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, caKeyFile))
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	signer, err := certpem.ParsePrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: %s: %w", caKeyFile, err)
	}
	key, ok := signer.(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("pki: %s does not match %s", caKeyFile, caCertFile)
	}
	seedPEM, err := os.ReadFile(filepath.Join(dir, caPQKeyFile))
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	block, _ := pem.Decode(seedPEM)
	if block == nil || block.Type != "ML-DSA-65 SEED" || len(block.Bytes) != mldsa65.SeedSize {
		return nil, fmt.Errorf("pki: %s: not an ML-DSA-65 seed", caPQKeyFile)
	}
	var seed [mldsa65.SeedSize]byte
	copy(seed[:], block.Bytes)
	pqPub, pqKey := mldsa65.NewKeyFromSeed(&seed)
	ca := newCA(td, cert, key, pqKey, pqPub)
	ca.dir = dir
	ca.stamp, ca.seq = stampOf(dir), sequenceOf(dir)
	if err := ca.loadState(); err != nil {
		return nil, err
	}
	if err := ca.loadSM2(); err != nil {
		return nil, err
	}
	return ca, nil
}

func newCA(td spiffeid.TrustDomain, cert *x509.Certificate, key *ecdsa.PrivateKey, pqKey *mldsa65.PrivateKey, pqPub *mldsa65.PublicKey) *CA {
	return &CA{td: td, cert: cert, key: key, pqKey: pqKey, pqPub: pqPub, now: time.Now, bundle: []*x509.Certificate{cert}}
}

// TrustDomain is the CA's trust domain.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// Root is the CA's root certificate.
func (c *CA) Root() *x509.Certificate { return c.cert }

// PQSigner is the CA's ML-DSA-65 key as a crypto.Signer, used to certify post-quantum
// identity credentials (see package pqkex). It never leaves the process.
func (c *CA) PQSigner() crypto.Signer { return c.pqKey }

// Signer is the CA's classical (ECDSA P-256) root key as a crypto.Signer. Besides X.509
// leaves it co-signs post-quantum credentials, so that forging one needs both CA keys.
// It never leaves the process.
func (c *CA) Signer() crypto.Signer { return c.key }

// PQPublicKey is the CA's ML-DSA-65 public key, which peers use to verify credentials.
func (c *CA) PQPublicKey() *mldsa65.PublicKey { return c.pqPub }

// LeafOption adds to an issued leaf (Issue, IssueUnrecorded, IssueFiles).
type LeafOption interface {
	applyToLeaf(*x509.Certificate)
}

type leafOption func(*x509.Certificate)

func (f leafOption) applyToLeaf(c *x509.Certificate) { f(c) }

// WithDNSNames adds DNS SANs, so that clients that check host names (curl, browsers)
// accept the server. The SPIFFE ID stays the only URI SAN.
func WithDNSNames(names ...string) LeafOption {
	return leafOption(func(c *x509.Certificate) { c.DNSNames = append(c.DNSNames, names...) })
}

// WithIPAddresses adds IP address SANs.
func WithIPAddresses(ips ...net.IP) LeafOption {
	return leafOption(func(c *x509.Certificate) { c.IPAddresses = append(c.IPAddresses, ips...) })
}

// Issue signs a leaf certificate for id over pub, valid for ttl (DefaultLeafTTL if
// zero, at most MaxLeafTTL). The leaf carries id as its only URI SAN, with the
// serverAuth and clientAuth extended key usages. It returns the leaf and its chain.
func (c *CA) Issue(id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration, opts ...LeafOption) ([]*x509.Certificate, error) {
	return c.issue(id, pub, ttl, true, opts...)
}

// IssueUnrecorded is Issue for a leaf its holder replaces as soon as the signing root
// changes, such as the online CA's own serving certificate: it is not entered in the
// ledger of issued leaves, so it does not hold back FinishRotation.
func (c *CA) IssueUnrecorded(id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration, opts ...LeafOption) ([]*x509.Certificate, error) {
	return c.issue(id, pub, ttl, false, opts...)
}

func (c *CA) issue(id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration, record bool, opts ...LeafOption) ([]*x509.Certificate, error) {
	if !id.MemberOf(c.td) {
		return nil, fmt.Errorf("pki: %s is not in trust domain %s", id, c.td)
	}
	switch {
	case ttl == 0:
		ttl = DefaultLeafTTL
	case ttl < 0:
		return nil, errors.New("pki: negative TTL")
	case ttl > MaxLeafTTL:
		return nil, fmt.Errorf("pki: TTL %s exceeds the maximum %s", ttl, MaxLeafTTL)
	}
	issuer, issuerKey, chainRest := c.cert, c.key, []*x509.Certificate(nil)
	if c.inter != nil {
		issuer, issuerKey, chainRest = c.inter, c.interKey, []*x509.Certificate{c.inter}
	}
	now := c.now()
	notAfter := now.Add(ttl)
	if notAfter.After(issuer.NotAfter) {
		notAfter = issuer.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(),
		Subject:               pkix.Name{Organization: []string{"Veil"}},
		URIs:                  []*neturl.URL{id.URL()},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		AuthorityKeyId:        issuer.SubjectKeyId,
	}
	for _, o := range opts {
		o.applyToLeaf(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, pub, issuerKey)
	if err != nil {
		return nil, fmt.Errorf("pki: issue %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	if record {
		if err := c.recordIssued(leaf); err != nil {
			return nil, err
		}
	}
	return append([]*x509.Certificate{leaf}, chainRest...), nil
}

// IssueFiles generates a P-256 key for id, issues its leaf, and writes tls.crt,
// tls.key (0600) and ca.crt into dir (created 0700 if missing).
func (c *CA) IssueFiles(id spiffeid.ID, dir string, ttl time.Duration, opts ...LeafOption) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	chain, err := c.Issue(id, &key.PublicKey, ttl, opts...)
	if err != nil {
		return err
	}
	return transport.WriteIdentity(dir, chain, key, c.Bundle())
}

// newRoot self-signs a ten-year root certificate for td over key.
func newRoot(td spiffeid.TrustDomain, key *ecdsa.PrivateKey, commonName string) (*x509.Certificate, []byte, error) {
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(),
		Subject:               pkix.Name{Organization: []string{"Veil"}, CommonName: commonName},
		URIs:                  []*neturl.URL{td.ID().URL()},
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          keyID(&key.PublicKey),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: root certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: root certificate: %w", err)
	}
	return cert, der, nil
}

func newSerial() *big.Int {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic("pki: crypto/rand failed: " + err.Error()) // crypto/rand never fails on supported platforms
	}
	b[0] &= 0x7f
	return new(big.Int).SetBytes(b)
}

func keyID(pub *ecdsa.PublicKey) []byte {
	b, _ := x509.MarshalPKIXPublicKey(pub)
	sum := sha256.Sum256(b)
	return sum[:20]
}
