package pqkex

import (
	"bytes"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"

	"connectrpc.com/connect"
)

func TestTLSEphemeralGroup(t *testing.T) {
	groups := []tls.CurveID{tls.X25519MLKEM768, tls.SecP256r1MLKEM768, tls.SecP384r1MLKEM1024,
		tls.X25519, tls.CurveP256, tls.CurveP384, tls.CurveP521, 0}
	want := map[Scheme][]tls.CurveID{
		X25519MLKEM768(): {tls.X25519MLKEM768, tls.SecP256r1MLKEM768, tls.SecP384r1MLKEM1024},
		X448MLKEM1024():  {tls.SecP384r1MLKEM1024},
	}
	for suite, pq := range want {
		for _, g := range groups {
			if got := tlsEphemeralGroup(suite, g); got != slices.Contains(pq, g) {
				t.Errorf("%s over %s: %v", suite.Name(), g, got)
			}
		}
	}
}

// TestTLSEphemeralRefusal: a server refuses a hello with flagTLSEphemeral unless its TLS
// connection's group is post-quantum for the suite, with tls_not_pq (failed_precondition),
// before the channel binding check; hellos without the flag are not concerned.
func TestTLSEphemeralRefusal(t *testing.T) {
	vs := loadKAT(t)
	for _, tt := range []struct {
		vector int
		tls    *tls.ConnectionState
		reason reason
	}{
		{3, nil, reasonTLSNotPQ},
		{3, &tls.ConnectionState{CurveID: tls.X25519}, reasonTLSNotPQ},
		{3, &tls.ConnectionState{CurveID: tls.CurveP384}, reasonTLSNotPQ},
		// Post-quantum: on to the channel binding, which fails (no peer certificate here).
		{3, &tls.ConnectionState{CurveID: tls.X25519MLKEM768}, reasonCredential},
		{3, &tls.ConnectionState{CurveID: tls.SecP256r1MLKEM768}, reasonCredential},
		// The X448 vector binds with flags 0x01: the group is not checked.
		{4, &tls.ConnectionState{CurveID: tls.X25519}, reasonCredential},
		// Without the flag the group is not checked.
		{1, &tls.ConnectionState{CurveID: tls.X25519}, reasonCredential},
	} {
		v := vs[tt.vector]
		s := katServer(t, v)
		r := httptest.NewRequest(http.MethodPost, HandshakePath, bytes.NewReader(v.ClientHello))
		r.TLS = tt.tls
		w := httptest.NewRecorder()
		s.Handler(http.NotFoundHandler()).ServeHTTP(w, r)
		group := "none"
		if tt.tls != nil {
			group = tt.tls.CurveID.String()
		}
		if got := w.Header().Get(headerError); got != string(tt.reason) {
			t.Errorf("vector %d over %s: refused with %q, want %q", tt.vector, group, got, tt.reason)
		}
	}
	// The refusal reaches the client unauthenticated: it retries by its reason, and a
	// caller never sees the server-side code (spec 9).
	if err := handshakeRefusal(string(reasonTLSNotPQ), "2"); reasonOf(err) != reasonTLSNotPQ || toConnect(err).Code() != connect.CodeUnavailable {
		t.Errorf("tls_not_pq is %v (%v), want its reason and unavailable", reasonOf(err), toConnect(err).Code())
	}
}
