package rpc_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/transport"
)

// TestHTTP3HandshakeRefusalsCounted: the README's TLS refusals hold over QUIC as over TCP.
// A client without a certificate, with one from another CA, an expired one, one without a
// SPIFFE ID or with two fails the QUIC handshake, and the server counts each under the
// same reason (TestHTTP3ClassicOnlyRefused: the classic-only ClientHello; TLS 1.2 and
// plain HTTP cannot reach QUIC, which is TLS 1.3 only).
func TestHTTP3HandshakeRefusalsCounted(t *testing.T) {
	e := transports[1].start(t)
	otherDir := t.TempDir()
	otherCA, err := pki.InitCA(otherDir+"/ca", "example.org")
	if err != nil {
		t.Fatal(err)
	}
	good := identity(t, e.ca, e.dir, clientID)
	now := time.Now()
	clientURI := spiffeid.RequireFromString(clientID).URL()
	cases := []struct {
		name   string
		cert   func() (*tls.Certificate, error) // the certificate the client presents
		reason transport.Reason
	}{
		{"no client certificate", func() (*tls.Certificate, error) { return &tls.Certificate{}, nil }, transport.ReasonNoClientCert},
		{"certificate from another CA", leafOf(t, otherCA, &x509.Certificate{NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), URIs: []*url.URL{clientURI}}), transport.ReasonUnknownAuthority},
		{"expired certificate", leafOf(t, e.ca, &x509.Certificate{NotBefore: now.Add(-2 * time.Hour), NotAfter: now.Add(-time.Hour), URIs: []*url.URL{clientURI}}), transport.ReasonExpired},
		{"no SPIFFE ID", leafOf(t, e.ca, &x509.Certificate{NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), Subject: pkix.Name{CommonName: "client"}, DNSNames: []string{"client.example.org"}}), transport.ReasonNoSPIFFEID},
		{"two SPIFFE IDs", leafOf(t, e.ca, &x509.Certificate{NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), URIs: []*url.URL{clientURI, spiffeid.RequireFromString("spiffe://example.org/b").URL()}}), transport.ReasonManySPIFFEIDs},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := metricValue(t, e, "veil_tls_handshake_failures_total", "reason", string(c.reason))
			tlsCfg := transport.ClientConfig(good, transport.WithAuthorizer(transport.AuthorizeID(spiffeid.RequireFromString(serverID))))
			tlsCfg.NextProtos = []string{http3.NextProtoH3}
			tlsCfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return c.cert() }
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			conn, err := quic.DialAddr(ctx, e.udpAddr(t).String(), tlsCfg, nil)
			if err == nil {
				// In TLS 1.3 the client finishes before the server checks its certificate: the
				// refusal arrives as the connection's close.
				<-conn.Context().Done()
				_ = conn.CloseWithError(0, "")
			}
			// The server counts the refusal when its handshake fails: wait for that event.
			poll(t, func() bool {
				return metricValue(t, e, "veil_tls_handshake_failures_total", "reason", string(c.reason)) == before+1
			})
			// And the server keeps serving others over HTTP/3.
			e.callH3(t)
		})
	}
}

// leafOf returns a certificate callback for a leaf made from tmpl and signed by ca's root
// (InitCA's root signs leaves).
func leafOf(t *testing.T, ca *pki.CA, tmpl *x509.Certificate) func() (*tls.Certificate, error) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = serial
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Root(), &key.PublicKey, ca.Signer())
	if err != nil {
		t.Fatal(err)
	}
	return func() (*tls.Certificate, error) {
		return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
	}
}

// poll waits until cond holds: the server counts a refusal in its own goroutine, after or
// while the client learns of it. The minute is a hang guard, not a timing expectation.
func poll(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("the server did not count the refusal")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
