// Package pqkex seals Connect RPC payloads end to end with a post-quantum hybrid handshake
// layered over mTLS, so that a TLS-terminating proxy sees only ciphertext.
//
// The protocol is specified in docs/pqkex.md; read it first. In short: each workload holds a
// static hybrid KEM key (X25519+ML-KEM-768 by default, X448+ML-KEM-1024 for high security)
// certified by the CA with both an ML-DSA-65 and a classical signature ([IssueCredential]).
// One round trip ([Client] to [Server]) establishes a session authenticated in both directions
// by KEM decapsulation; the server returns an encrypted, stateless ticket, sealed to its own
// SPIFFE ID, that any replica of the same service sharing its [TicketKeys] accepts (each
// service has its own keys; they rotate and are erased automatically). Every later call
// carries the ticket and a call ID, and its request and response bodies travel in AEAD frames
// under per-call keys bound to the server and the procedure, with in-stream KEM rekeys for
// long streams. A client must name the server it expects ([WithAuthorizer]; accepting any is
// [InsecureAcceptAnyServer]). Clients bind the session to the TLS connection by default, which
// lets the handshake use the ML-KEM halves only, the TLS handshake supplying the classical
// half; [WithoutChannelBinding] turns that off for servers behind a TLS-terminating proxy.
//
// Turning it on takes one option on each side:
//
//	srv, err := pqkex.NewServer(pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.WithTicketKeys(keys))
//	handler := srv.Handler(mux) // wraps connect-go handlers; serves the handshake endpoints
//
//	cli, err := pqkex.NewClient(pqkex.WithIdentity(id), pqkex.WithRoots(roots),
//		pqkex.WithAuthorizer(pqkex.AuthorizeID("spiffe://example.org/service")))
//	httpClient := &http.Client{Transport: cli.RoundTripper(http2Transport)}
//
// Handlers read the authenticated peer with [PeerFromContext]. Failures map to distinct Connect
// codes (docs/pqkex.md section 9) and are counted in veil_pqkex_rejections_total.
package pqkex
