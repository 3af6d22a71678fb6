package rpc

import (
	"context"
	"crypto/tls"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/transport"
)

// Peer is the verified caller of an RPC, as seen on its TLS connection.
type Peer struct {
	// ID is the SPIFFE ID from the caller's certificate.
	ID spiffeid.ID
	// TLSGroup is the negotiated key exchange, e.g. X25519MLKEM768.
	TLSGroup tls.CurveID
	// TLSVersion is the negotiated TLS version (always TLS 1.3).
	TLSVersion uint16
	// Resumed reports whether the TLS session was resumed from a ticket.
	Resumed bool
	// NotAfter is when the caller's certificate expires.
	NotAfter time.Time
	// Addr is the remote network address.
	Addr string

	// Sealed reports whether the call is sealed end to end (package pqkex). Then ID is
	// the identity authenticated by the post-quantum handshake, which holds across
	// proxies, and HopID is the TLS peer (the proxy, or the caller itself).
	Sealed bool
	// HopID is the SPIFFE ID of the TLS peer when the call is sealed.
	HopID spiffeid.ID
	// PQSuite names the pqkex suite of a sealed call, e.g. "X25519MLKEM768-SHA256".
	PQSuite string
	// ChannelBound reports whether the sealed session is bound to this TLS connection
	// (no terminating proxy in between).
	ChannelBound bool
}

// PostQuantum reports whether the connection's key exchange is a post-quantum hybrid.
func (p Peer) PostQuantum() bool { return transport.IsPQGroup(p.TLSGroup) }

type peerKey struct{}

// PeerFromContext returns the verified caller of the RPC being handled.
func PeerFromContext(ctx context.Context) (Peer, bool) {
	p, ok := ctx.Value(peerKey{}).(*Peer)
	if !ok || p == nil {
		return Peer{}, false
	}
	return *p, true
}

// withPeer puts the TLS peer of each request into its context. Requests without a
// verified peer never get here: the TLS handshake refuses them.
func withPeer(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := transport.PeerID(r.TLS)
		if err != nil {
			http.Error(w, "rpc: no verified client certificate", http.StatusUnauthorized)
			return
		}
		p := &Peer{
			ID:         id,
			TLSGroup:   r.TLS.CurveID,
			TLSVersion: r.TLS.Version,
			Resumed:    r.TLS.DidResume,
			NotAfter:   r.TLS.PeerCertificates[0].NotAfter,
			Addr:       r.RemoteAddr,
		}
		next.ServeHTTP(w, r.WithContext(withPeerValue(r.Context(), p)))
	})
}

// withPeerValue puts p into ctx. The request owns p: withSealedPeer completes it in place
// for a sealed call (on the request's goroutine, before any handler runs), which saves a
// context value and a request copy per call.
func withPeerValue(ctx context.Context, p *Peer) context.Context {
	return context.WithValue(ctx, peerKey{}, p)
}
