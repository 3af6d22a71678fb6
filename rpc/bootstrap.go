package rpc

import (
	"net/http"

	"github.com/veilrpc/veil/transport"
)

// WithBootstrapProcedures lets callers without a client certificate reach exactly these
// procedures (for example the CA's Join, which authenticates its caller with a join
// token instead). The TLS handshake then accepts connections without a client
// certificate, and every other request on such a connection (other procedures, health,
// reflection) is refused with HTTP 401 before routing. A certificate that is presented
// is verified as usual. Bootstrap procedures skip the policy: they authenticate their
// callers themselves. Servers without this option refuse such handshakes outright.
func WithBootstrapProcedures(procedures ...string) ServerOption {
	return serverOption(func(c *serverConfig) {
		if c.bootstrap == nil {
			c.bootstrap = map[string]bool{}
		}
		for _, p := range procedures {
			c.bootstrap[p] = true
		}
	})
}

// peerHandler puts the verified peer into each request's context (withPeer), and lets a
// request without a client certificate through only to a bootstrap procedure.
func (s *Server) peerHandler(h http.Handler) http.Handler {
	withP := withPeer(h)
	if len(s.cfg.bootstrap) == 0 {
		return withP
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.PeerCertificates) == 0 && s.cfg.bootstrap[r.URL.Path] {
			h.ServeHTTP(w, r)
			return
		}
		withP.ServeHTTP(w, r)
	})
}

// bootstrapTLSOptions relaxes the handshake for servers with bootstrap procedures.
func (s *Server) bootstrapTLSOptions() []transport.Option {
	if len(s.cfg.bootstrap) == 0 {
		return nil
	}
	return []transport.Option{transport.WithOptionalClientCert()}
}
