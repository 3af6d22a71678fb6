package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net/url"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	cav1 "github.com/veilrpc/veil/gen/veil/ca/v1"
)

// FuzzParseCSR feeds untrusted request bytes to the CSR checks: they must refuse or
// accept, never panic, and accept only a single SPIFFE ID in the trust domain.
func FuzzParseCSR(f *testing.F) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	good, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{spiffeid.RequireFromString("spiffe://example.org/a").URL()}}, key)
	f.Add(good)
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x00})
	td := spiffeid.RequireTrustDomainFromString("example.org")
	f.Fuzz(func(t *testing.T, der []byte) {
		csr, id, r := parseCSR(der, td)
		if r != nil {
			if codes[r.reason] == 0 {
				t.Fatalf("reason %q has no code", r.reason)
			}
			return
		}
		if len(csr.URIs) != 1 || !id.MemberOf(td) || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) != 0 {
			t.Fatalf("accepted %v", csr.URIs)
		}
	})
}

// FuzzDecodeTrust feeds untrusted CA responses to the client's decoder.
func FuzzDecodeTrust(f *testing.F) {
	f.Add("example.org", []byte{0x30, 0x00}, "ab", "spiffe://example.org/x")
	f.Fuzz(func(t *testing.T, td string, root []byte, serial, id string) {
		_, _ = decodeTrust(&cav1.Bundle{TrustDomain: td, Roots: [][]byte{root}, DeniedSerials: []string{serial}, DeniedIds: []string{id}})
		_, _ = decodeIssued(&cav1.Issued{Chain: [][]byte{root}, Bundle: &cav1.Bundle{TrustDomain: td, Roots: [][]byte{root}}})
	})
}
