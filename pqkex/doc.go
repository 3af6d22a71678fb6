// Package pqkex seals Connect RPC payloads end to end with a post-quantum hybrid handshake
// layered over mTLS, so that a TLS-terminating proxy sees only ciphertext.
//
// The protocol is specified in docs/pqkex.md; read it first. In short: each workload holds a
// static hybrid KEM key certified by the CA (ML-DSA-65 and a classical signature, see
// [IssueCredential]). One round trip ([Client] to [Server]) establishes a session authenticated
// in both directions by KEM decapsulation; the server returns an encrypted, stateless ticket.
// Every later call carries the ticket and a call ID, and its request and response bodies travel
// in AEAD frames under per-call keys.
//
// Turning it on takes one option on each side:
//
//	srv, err := pqkex.NewServer(pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.WithTicketKeys(keys))
//	handler := srv.Handler(mux) // wraps connect-go handlers; serves the handshake endpoints
//
//	cli, err := pqkex.NewClient(pqkex.WithIdentity(id), pqkex.WithRoots(roots))
//	httpClient := &http.Client{Transport: cli.RoundTripper(http2Transport)}
//
// Handlers read the authenticated peer with [PeerFromContext].
package pqkex
