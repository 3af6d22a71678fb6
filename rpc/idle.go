package rpc

import "net/http"

// withIdleCloser keeps http.Client.CloseIdleConnections working when round-tripper
// wrappers (sealing, WithRoundTripper) sit above the transport: http.Client forwards
// the call only to a Transport that has the method, and the wrappers do not. Without
// it, a sealed client's idle connections stayed open until IdleConnTimeout.
func withIdleCloser(rt http.RoundTripper, t idleClosing) http.RoundTripper {
	if base, ok := t.(http.RoundTripper); ok && rt == base {
		return rt
	}
	return idleCloser{RoundTripper: rt, t: t}
}

type idleCloser struct {
	http.RoundTripper
	t idleClosing
}

// idleClosing is what a transport at the bottom of the client's stack (HTTP/2 or
// HTTP/3) has for http.Client.CloseIdleConnections.
type idleClosing interface{ CloseIdleConnections() }

func (c idleCloser) CloseIdleConnections() { c.t.CloseIdleConnections() }
