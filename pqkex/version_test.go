package pqkex_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/veilrpc/veil/pqkex"
)

// TestVersionRefusedByServer: a ClientHello of a wire version the server does not speak, an
// older client's 1 or a newer client's 3, is refused with the reason `version` and the
// versions the server speaks (spec 5.5, 9).
func TestVersionRefusedByServer(t *testing.T) {
	e := newEnv(t, testSuite(t))
	reg := prometheus.NewRegistry()
	ts := e.startServer(t, echoMux(), pqkex.WithMetrics(reg))
	base := e.transport(t, clientID)
	m := &mitm{base: base}
	hc, _ := e.httpClient(t, m)
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}
	var hello []byte
	for _, r := range m.seen {
		if strings.HasSuffix(r.url, pqkex.HandshakePath) {
			hello = r.body
		}
	}
	if len(hello) < 2 {
		t.Fatal("no hello recorded")
	}
	if hello[0] != 2 {
		t.Errorf("the client's hello is of version %d, want 2", hello[0])
	}
	for i, v := range []byte{1, 3} {
		b := append([]byte(nil), hello...)
		b[0] = v
		req, err := http.NewRequest(http.MethodPost, ts.URL+pqkex.HandshakePath, bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := base.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if got := resp.Header.Get("Veil-Pqkex-Error"); got != "version" {
			t.Errorf("hello of version %d: Veil-Pqkex-Error %q, want version", v, got)
		}
		if got := resp.Header.Get("Veil-Pqkex-Version"); got != "2" {
			t.Errorf("hello of version %d: Veil-Pqkex-Version %q, want 2", v, got)
		}
		if want := "wire version " + string('0'+rune(v)) + " refused"; !strings.Contains(string(body), want) {
			t.Errorf("hello of version %d: refusal %.80q does not say %q", v, body, want)
		}
		if got := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "server", "reason": "version"}); got != float64(i+1) {
			t.Errorf("server version rejections = %v, want %d", got, i+1)
		}
	}
}

// TestVersionRefusedToClient: a server that does not speak the client's version refuses
// it, whether it predates negotiation (version 1 answers `unsupported` and no version
// header), is newer (`version` and its versions), or answers in another version; the
// client reports each with the reason `version` and a message naming the versions, as
// unavailable: the refusal is unauthenticated, so its code is never one a proxy chooses.
func TestVersionRefusedToClient(t *testing.T) {
	e := newEnv(t, testSuite(t))
	srv, err := pqkex.NewServer(pqkex.WithIdentity(e.server), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock))
	if err != nil {
		t.Fatal(err)
	}
	real := srv.Handler(echoMux())
	var answer func(w http.ResponseWriter, r *http.Request)
	ts := e.serveTLS(t, serverID, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == pqkex.HandshakePath {
			answer(w, r)
			return
		}
		real.ServeHTTP(w, r)
	}))
	for _, tc := range []struct {
		name   string
		answer func(w http.ResponseWriter, r *http.Request)
		want   string
	}{
		{"older server", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Veil-Pqkex-Error", "unsupported") // what a version-1 server answers
			w.WriteHeader(http.StatusNotImplemented)
		}, "predates wire version 2"},
		{"newer server", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Veil-Pqkex-Error", "version")
			w.Header().Set("Veil-Pqkex-Version", "3")
			w.WriteHeader(http.StatusNotImplemented)
		}, "speaks wire version 3"},
		{"server hello of another version", func(w http.ResponseWriter, r *http.Request) {
			rec := httptest.NewRecorder()
			real.ServeHTTP(rec, r)
			b := rec.Body.Bytes()
			if len(b) > 0 {
				b[0] = 3
			}
			w.WriteHeader(rec.Code)
			_, _ = w.Write(b)
		}, "another wire version"},
	} {
		answer = tc.answer
		_, pc := e.httpClient(t, e.transport(t, clientID))
		err := pc.Handshake(context.Background(), e.transport(t, clientID), ts.URL)
		if connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want unavailable saying %q", tc.name, err, tc.want)
		}
	}
}
