// Package transport is Veil's strict mutual-TLS layer: TLS 1.3 only, SPIFFE identities
// (exactly one SPIFFE ID URI SAN per certificate), post-quantum hybrid key exchange
// (X25519MLKEM768) preferred or required, and a small built-in certificate authority.
//
// Identities come from a Source: the workload's own X.509-SVID and the trust bundles it
// verifies peers with. The interfaces are go-spiffe's x509svid.Source and
// x509bundle.Source, so a static FileSource (the cert-manager Secret layout: tls.crt,
// tls.key, ca.crt) and a live SPIRE workloadapi.X509Source are interchangeable.
// ServerConfig and ClientConfig read the source through TLS callbacks on every
// handshake, so rotated material is used by new connections at once.
package transport
