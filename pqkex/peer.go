package pqkex

import "context"

// Peer is the authenticated pqkex peer of a call, as handlers see it.
type Peer struct {
	// SPIFFEID is the peer's identity from its verified credential.
	SPIFFEID string
	// Suite is the suite name, e.g. "X25519MLKEM768-SHA256".
	Suite string
	// AEAD seals the call's frames.
	AEAD AEAD
	// ChannelBound reports whether the session was bound to a direct TLS connection with the
	// peer (no terminating proxy in between when it was established).
	ChannelBound bool
}

type peerKey struct{}

// PeerFromContext returns the pqkex peer of a sealed call. ok is false for plaintext calls
// (PERMISSIVE procedures) and outside pqkex.
func PeerFromContext(ctx context.Context) (Peer, bool) {
	p, ok := ctx.Value(peerKey{}).(*Peer)
	if !ok || p == nil {
		return Peer{}, false
	}
	return *p, true
}

// withPeer returns ctx with p, which must not change afterwards: the server passes a
// pointer into its per-call struct, so that the context value needs no allocation.
func withPeer(ctx context.Context, p *Peer) context.Context {
	return context.WithValue(ctx, peerKey{}, p)
}
