package pqkex_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilrpc/veil/pqkex"
)

// redirectHandshakes sends handshake POSTs to another server than credential requests and
// calls: a client of the default suite fetches a default server's credential, then offers a
// hello of that suite to the ShangMi-only server, as a client that ignored the server's suite
// (or a proxy replaying another service's hello) would.
type redirectHandshakes struct {
	base http.RoundTripper
	to   string // host:port
}

func (r redirectHandshakes) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Path == pqkex.HandshakePath {
		req = req.Clone(req.Context())
		req.URL.Host, req.Host = r.to, r.to
	}
	return r.base.RoundTrip(req)
}

func smOnly() pqkex.Option { return pqkex.RequireSuites(pqkex.SM2MLKEM768()) }

// A server that requires the ShangMi suite refuses a hello of every other suite with reason
// suite_policy and counts the refusal; its own ShangMi
// clients are served.
func TestShangMiOnlyServerRefusesOtherSuites(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	nb, na := testNow.Add(-time.Hour), testNow.Add(24*time.Hour)
	smServer, err := e.ca.Identity(pqkex.SM2MLKEM768(), serverID, nb, na, nil)
	if err != nil {
		t.Fatal(err)
	}
	smClient, err := e.ca.Identity(pqkex.SM2MLKEM768(), clientID, nb, na, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	sm := e.startServer(t, echoMux(), pqkex.WithIdentity(smServer), smOnly(), pqkex.WithMetrics(reg))
	plain := e.startServer(t, echoMux())
	ctx := context.Background()

	for _, s := range []pqkex.Scheme{pqkex.X25519MLKEM768(), pqkex.X448MLKEM1024()} {
		id, err := e.ca.Identity(s, clientID, nb, na, nil)
		if err != nil {
			t.Fatal(err)
		}
		srv := plain
		if s != pqkex.X25519MLKEM768() {
			srvID, err := e.ca.Identity(s, serverID, nb, na, nil)
			if err != nil {
				t.Fatal(err)
			}
			srv = e.startServer(t, echoMux(), pqkex.WithIdentity(srvID))
		}
		base := redirectHandshakes{base: e.transport(t, clientID), to: strings.TrimPrefix(sm.URL, "https://")}
		hc, _ := e.httpClient(t, base, pqkex.WithIdentity(id), pqkex.WithoutChannelBinding())
		_, errs := callKinds(ctx, hc, srv.URL, nil, "hi", false)
		err = errs["unary"]
		// Unauthenticated, so unavailable to the caller with the reason (spec 9).
		if connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), "suite_policy") {
			t.Errorf("%s hello to a ShangMi-only server: %v", s.Name(), err)
		}
	}
	if got := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "server", "reason": "suite_policy"}); got < 2 {
		t.Errorf("suite_policy refusals counted %v times, want at least 2", got)
	}

	// The ShangMi client, under the same policy, is served with SM4-GCM.
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithIdentity(smClient), smOnly())
	out, errs := callAll(ctx, hc, sm.URL, nil, "hi")
	if len(errs) != 0 || out["unary"] != "echo:hi|"+clientID {
		t.Fatalf("ShangMi client: %v %v", out, errs)
	}
}

// A client that requires the ShangMi suite sends no hello to a server of another suite, nor
// with an identity of another suite: nothing falls back.
func TestShangMiOnlyClientRefusesOtherSuites(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	nb, na := testNow.Add(-time.Hour), testNow.Add(24*time.Hour)
	reg := prometheus.NewRegistry()
	ts := e.startServer(t, echoMux(), pqkex.WithMetrics(reg))
	ctx := context.Background()

	// Own identity of the default suite.
	hc, _ := e.httpClient(t, e.transport(t, clientID), smOnly())
	_, errs := callKinds(ctx, hc, ts.URL, nil, "hi", false)
	if err := errs["unary"]; err == nil || !strings.Contains(err.Error(), "refused by policy") {
		t.Errorf("default identity under a ShangMi policy: %v", err)
	}
	// A ShangMi identity and a server of the default suite.
	smClient, err := e.ca.Identity(pqkex.SM2MLKEM768(), clientID, nb, na, nil)
	if err != nil {
		t.Fatal(err)
	}
	hc, _ = e.httpClient(t, e.transport(t, clientID), pqkex.WithIdentity(smClient), smOnly())
	_, errs = callKinds(ctx, hc, ts.URL, nil, "hi", false)
	if err := errs["unary"]; err == nil || !strings.Contains(err.Error(), "server's suite X25519MLKEM768-SHA256 refused by policy") {
		t.Errorf("default server to a ShangMi-only client: %v", err)
	}
	if got := counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "server", "result": "ok"}); got != 0 {
		t.Errorf("%v handshakes reached the server", got)
	}
	if got := counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "server", "result": "error"}); got != 0 {
		t.Errorf("%v hellos reached the server", got)
	}

	// Option errors.
	if _, err := pqkex.NewClient(pqkex.WithIdentity(smClient), pqkex.WithRoots(e.ca.Roots()), pqkex.InsecureAcceptAnyServer(), pqkex.RequireSuites()); err == nil {
		t.Error("RequireSuites() without a suite accepted")
	}
	if _, err := pqkex.NewServer(pqkex.WithIdentity(e.server), pqkex.WithRoots(e.ca.Roots()), smOnly()); err == nil {
		t.Error("a ShangMi-only server with a default-suite identity started")
	}
}

// A request whose body has ContentLength 0 but is not empty (net/http's "unknown length" for
// client requests, as http.Post gives for a reader of unknown type) arrives whole: it is
// streamed, not sealed as an empty body.
func TestUnknownLengthBodyWithZeroContentLength(t *testing.T) {
	e := newEnv(t, testSuite(t))
	mux := http.NewServeMux()
	mux.HandleFunc("/count", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, n)
	})
	ts := e.startServer(t, mux)
	hc, _ := e.httpClient(t, e.transport(t, clientID))
	for _, n := range []int64{0, 1, 300000} {
		res, err := hc.Post(ts.URL+"/count", "application/octet-stream", struct{ io.Reader }{io.LimitReader(zeroReader{}, n)})
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if string(got) != fmt.Sprint(n) {
			t.Errorf("%d bytes sent with ContentLength 0: the server read %s", n, got)
		}
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
