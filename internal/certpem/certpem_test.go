package certpem

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"
)

func testCert(t testing.TB) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "t"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

func TestRoundTrip(t *testing.T) {
	c, key := testCert(t)
	b := EncodeCertificates([]*x509.Certificate{c, c})
	// Other blocks (a key) are skipped.
	keyPEM, err := EncodePrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := ParseCertificates(append(append([]byte{}, keyPEM...), b...))
	if err != nil || len(certs) != 2 || !certs[0].Equal(c) {
		t.Fatalf("ParseCertificates: %d certificates, %v", len(certs), err)
	}
	back, err := ParsePrivateKey(keyPEM)
	if err != nil || !key.Equal(back) {
		t.Fatalf("ParsePrivateKey: %v", err)
	}
	for _, bad := range [][]byte{nil, []byte("not PEM"), keyPEM} {
		if _, err := ParseCertificates(bad); err == nil {
			t.Errorf("ParseCertificates(%.20q) found a certificate", bad)
		}
	}
	for _, bad := range [][]byte{nil, b, bytes.Replace(keyPEM, []byte("PRIVATE KEY"), []byte("RSA KEY"), 2)} {
		if _, err := ParsePrivateKey(bad); err == nil {
			t.Errorf("ParsePrivateKey(%.20q) accepted it", bad)
		}
	}
}

// FuzzParseCertificates: bundle files come from other processes (cert-manager, a CA);
// parsing must not panic, and what parses encodes to certificates that parse the same.
func FuzzParseCertificates(f *testing.F) {
	c, _ := testCert(f)
	f.Add(EncodeCertificates([]*x509.Certificate{c}))
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		certs, err := ParseCertificates(b)
		if err != nil {
			return
		}
		back, err := ParseCertificates(EncodeCertificates(certs))
		if err != nil || len(back) != len(certs) {
			t.Fatalf("round trip: %v", err)
		}
		for i := range certs {
			if !back[i].Equal(certs[i]) {
				t.Fatal("round trip changed a certificate")
			}
		}
		_, _ = ParsePrivateKey(b)
	})
}
