package rpc

import "net/http"

// withIdleCloser keeps http.Client.CloseIdleConnections working when round-tripper
// wrappers (sealing, WithRoundTripper) sit above the transport: http.Client forwards
// the call only to a Transport that has the method, and the wrappers do not. Without
// it, a sealed client's idle connections stayed open until IdleConnTimeout.
func withIdleCloser(rt http.RoundTripper, t *http.Transport) http.RoundTripper {
	if rt == http.RoundTripper(t) {
		return t
	}
	return idleCloser{RoundTripper: rt, t: t}
}

type idleCloser struct {
	http.RoundTripper
	t *http.Transport
}

func (c idleCloser) CloseIdleConnections() { c.t.CloseIdleConnections() }
