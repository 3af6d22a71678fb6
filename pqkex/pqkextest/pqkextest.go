// Package pqkextest provides test certificate authorities, identities and deterministic
// randomness for pqkex tests, examples and benchmarks. It is not for production use: its keys
// are generated in memory and some of them are derived from public seeds.
package pqkextest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"net/url"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/emmansun/gmsm/sm2"
	"github.com/veilrpc/veil/pqkex"
)

// CA is a test certificate authority with an ML-DSA-65 key (for pqkex credentials) and a
// classical key that signs both the X.509 certificates and the classical half of credentials.
type CA struct {
	PQ        *mldsa65.PrivateKey
	Classical crypto.Signer
	SM2       crypto.Signer // signs the classical half of ShangMi credentials
	Cert      *x509.Certificate
	Pool      *x509.CertPool
}

// NewCA returns a CA with random keys and an ECDSA P-256 X.509 root.
func NewCA() (*CA, error) {
	_, pq, err := mldsa65.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	cl, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	return newCA(pq, cl)
}

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func newCA(pq *mldsa65.PrivateKey, cl crypto.Signer) (*CA, error) {
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "pqkextest CA"},
		NotBefore:             epoch,
		NotAfter:              epoch.AddDate(10, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, cl.Public(), cl)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	sm, err := sm2.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	return &CA{PQ: pq, Classical: cl, SM2: sm, Cert: cert, Pool: pool}, nil
}

// Roots returns the CA's public keys as pqkex roots.
func (ca *CA) Roots() pqkex.Roots {
	return pqkex.Roots{PQ: ca.PQ.Public(), Classical: ca.Classical.Public(), SM2: ca.SM2.Public()}
}

// Identity generates a static key (from rand, or crypto/rand when nil) and issues a credential
// for spiffeID over [notBefore, notAfter).
func (ca *CA) Identity(suite pqkex.Scheme, spiffeID string, notBefore, notAfter time.Time, rand io.Reader) (*pqkex.Identity, error) {
	pub, priv, err := pqkex.GenerateKey(suite, rand)
	if err != nil {
		return nil, err
	}
	signer := ca.Classical
	if suite.ID() == pqkex.SM2MLKEM768().ID() {
		signer = ca.SM2
	}
	cred, err := pqkex.IssueCredential(ca.PQ, signer, suite, spiffeID, notBefore, notAfter, pub)
	if err != nil {
		return nil, err
	}
	return pqkex.NewIdentity(cred, priv)
}

// TLSCertificate issues an ECDSA P-256 leaf for spiffeID (as URI SAN) and the DNS names,
// usable for both server and client authentication.
func (ca *CA) TLSCertificate(spiffeID string, dnsNames ...string) (tls.Certificate, error) {
	u, err := url.Parse(spiffeID)
	if err != nil {
		return tls.Certificate{}, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    epoch,
		NotAfter:     epoch.AddDate(10, 0, 0),
		URIs:         []*url.URL{u},
		DNSNames:     dnsNames,
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Classical)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// ServerTLSConfig returns a TLS 1.3 mTLS server configuration for spiffeID.
func (ca *CA) ServerTLSConfig(spiffeID string) (*tls.Config, error) {
	cert, err := ca.TLSCertificate(spiffeID, "localhost", "example.com")
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    ca.Pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}, nil
}

// ClientTLSConfig returns a TLS 1.3 mTLS client configuration for spiffeID.
func (ca *CA) ClientTLSConfig(spiffeID string) (*tls.Config, error) {
	cert, err := ca.TLSCertificate(spiffeID)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      ca.Pool,
	}, nil
}
