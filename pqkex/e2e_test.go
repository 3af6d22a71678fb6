package pqkex_test

import (
	"context"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilrpc/veil/pqkex"
)

func TestEndToEndAllKindsAllProtocols(t *testing.T) {
	for _, suite := range pqkex.Schemes() {
		t.Run(suite.Name(), func(t *testing.T) {
			e := newEnv(t, suite)
			ts := e.startServer(t, echoMux())
			hc, _ := e.httpClient(t, e.transport(t, clientID))
			for _, p := range protocols {
				t.Run(p.name, func(t *testing.T) {
					ctx := context.Background()
					out, errs := callAll(ctx, hc, ts.URL, p.opts, "hello")
					for k, err := range errs {
						t.Errorf("%s: %v", k, err)
					}
					want := map[string]string{
						"unary":  "echo:hello|" + clientID,
						"client": "a+hello+c|" + clientID,
						"server": "hello#0,hello#1,hello#2|" + clientID,
						"bidi":   "echo:x,echo:hello|" + clientID,
					}
					for k, w := range want {
						if out[k] != w {
							t.Errorf("%s = %q, want %q", k, out[k], w)
						}
					}
					// Errors travel sealed and keep code, message and metadata.
					_, errs = callAll(ctx, hc, ts.URL, p.opts, failMessage)
					for _, k := range []string{"unary", "client", "server", "bidi"} {
						err := errs[k]
						if connect.CodeOf(err) != connect.CodeNotFound || !strings.Contains(err.Error(), "secret-error-detail") {
							t.Errorf("%s error = %v, want not_found with detail", k, err)
						}
					}
				})
			}
		})
	}
}

// Client.Handshake sets a session up before the first call; each call replaces the session
// with a fresh one, and calls use the current one.
func TestClientHandshakeAhead(t *testing.T) {
	e := newEnv(t, testSuite(t))
	reg := prometheus.NewRegistry()
	ts := e.startServer(t, echoMux(), pqkex.WithMetrics(reg))
	base := e.transport(t, clientID)
	hc, c := e.httpClient(t, base, pqkex.WithoutChannelBinding())
	ctx := context.Background()
	for i := 1; i <= 2; i++ {
		if err := c.Handshake(ctx, base, ts.URL); err != nil {
			t.Fatal(err)
		}
		if got := counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "server", "result": "ok"}); got != float64(i) {
			t.Fatalf("after Handshake %d: %v server handshakes", i, got)
		}
	}
	out, errs := callKinds(ctx, hc, ts.URL, nil, "hi", false)
	if len(errs) != 0 || out["unary"] != "echo:hi|"+clientID {
		t.Fatalf("calls after Handshake: %v %v", out, errs)
	}
	if got := counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "server", "result": "ok"}); got != 2 {
		t.Fatalf("calls ran %v handshakes in all, want the 2 of Handshake", got)
	}
	if err := c.Handshake(ctx, base, "not a url"); err == nil {
		t.Fatal("Handshake accepted a URL without a host")
	}
}
