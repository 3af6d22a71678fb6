package pqkex_test

import (
	"context"
	"strings"
	"testing"

	"connectrpc.com/connect"
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
