package ca

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// parseCSR checks a PKCS#10 request from the network: it must parse, carry a valid
// self-signature over a strong key, and name exactly one SAN, a SPIFFE ID in td.
// Everything else in the request (subject, extensions) is ignored: the CA builds the
// certificate from its own template.
func parseCSR(der []byte, td spiffeid.TrustDomain) (*x509.CertificateRequest, spiffeid.ID, *refusal) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, spiffeid.ID{}, refuse(reasonBadCSR, "ca: CSR does not parse: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, spiffeid.ID{}, refuse(reasonBadSignature, "ca: CSR signature is invalid: %v", err)
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return nil, spiffeid.ID{}, refuse(reasonWeakKey, "ca: ECDSA curve %s is not accepted (use P-256 or P-384)", k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return nil, spiffeid.ID{}, refuse(reasonWeakKey, "ca: %d-bit RSA key is too weak (at least 2048)", k.N.BitLen())
		}
	default:
		return nil, spiffeid.ID{}, refuse(reasonWeakKey, "ca: unsupported public key type %T", csr.PublicKey)
	}
	if n := len(csr.DNSNames) + len(csr.IPAddresses) + len(csr.EmailAddresses); n > 0 || len(csr.URIs) > 1 {
		return nil, spiffeid.ID{}, refuse(reasonExtraSANs, "ca: CSR has SANs besides its SPIFFE ID (%d DNS, %d IP, %d email, %d URI)",
			len(csr.DNSNames), len(csr.IPAddresses), len(csr.EmailAddresses), len(csr.URIs))
	}
	if len(csr.URIs) == 0 {
		return nil, spiffeid.ID{}, refuse(reasonWrongID, "ca: CSR has no SPIFFE ID URI SAN")
	}
	id, err := spiffeid.FromURI(csr.URIs[0])
	if err != nil {
		return nil, spiffeid.ID{}, refuse(reasonWrongID, "ca: CSR URI SAN is not a SPIFFE ID: %v", err)
	}
	if !id.MemberOf(td) {
		return nil, spiffeid.ID{}, refuse(reasonWrongID, "ca: %s is not in trust domain %s", id, td)
	}
	if id.Path() == "" {
		return nil, spiffeid.ID{}, refuse(reasonWrongID, "ca: %s names a trust domain, not a workload", id)
	}
	return csr, id, nil
}
