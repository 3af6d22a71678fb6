// Package transport is Veil's strict mutual-TLS layer: TLS 1.3 only, SPIFFE identities
// (exactly one SPIFFE ID URI SAN per certificate), post-quantum hybrid key exchange
// (X25519MLKEM768) required by default (PQStrict, the zero PQMode), and authorization
// of the peer's SPIFFE ID. With no options every config is the safe one: see Option.
//
// Identities come from a Source: the workload's own X.509-SVID and the trust bundles it
// verifies peers with. The interfaces are go-spiffe's x509svid.Source and
// x509bundle.Source, so a static FileSource (the cert-manager Secret layout: tls.crt,
// tls.key, ca.crt), a RenewingSource that joins and renews with an online CA, and a
// live SPIRE workloadapi.X509Source are interchangeable. ServerConfig and ClientConfig
// read the source through TLS callbacks on every handshake, so rotated material is used
// by new connections at once. A Source that also implements DenylistSource has revoked
// peers refused on every handshake, resumed ones included. A refused handshake carries
// a Reason (HandshakeError, Observer); docs/refusals.md lists them all.
//
// The certificate authority that issues these identities is package pki (it imports
// this package, never the reverse); docs/ca.md describes the whole identity lifecycle:
// issuance, renewal, root rotation and revocation.
package transport
