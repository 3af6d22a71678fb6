package pqkex_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/veilrpc/veil/pqkex"
)

// serveGroups is startServer over a TLS server that negotiates only groups.
func (e *env) serveGroups(t *testing.T, next http.Handler, groups []tls.CurveID, opts ...pqkex.ServerOption) *httptest.Server {
	t.Helper()
	opts = append([]pqkex.ServerOption{pqkex.WithIdentity(e.server), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock)}, opts...)
	srv, err := pqkex.NewServer(opts...)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(srv.Handler(next))
	ts.EnableHTTP2 = true
	cfg, err := e.ca.ServerTLSConfig(serverID)
	if err != nil {
		t.Fatal(err)
	}
	cfg.CurvePreferences = groups
	ts.TLS = cfg
	ts.StartTLS()
	t.Cleanup(ts.Close)
	return ts
}

// TestTLSEphemeral: a channel-bound client leaves out the pqkex ephemeral when the TLS
// group carries a post-quantum ephemeral for the suite, and otherwise is refused with
// tls_not_pq and retries once with it (spec 5.3). Either way the session is bound and works,
// and the server goes on serving.
func TestTLSEphemeral(t *testing.T) {
	for _, tt := range []struct {
		name     string
		suite    pqkex.Scheme
		groups   []tls.CurveID
		fallback bool
	}{
		{"768 over X25519MLKEM768", pqkex.X25519MLKEM768(), []tls.CurveID{tls.X25519MLKEM768}, false},
		{"768 over SecP256r1MLKEM768", pqkex.X25519MLKEM768(), []tls.CurveID{tls.SecP256r1MLKEM768}, false},
		{"768 over SecP384r1MLKEM1024", pqkex.X25519MLKEM768(), []tls.CurveID{tls.SecP384r1MLKEM1024}, false},
		{"768 over X25519", pqkex.X25519MLKEM768(), []tls.CurveID{tls.X25519}, true},
		{"768 over P-256", pqkex.X25519MLKEM768(), []tls.CurveID{tls.CurveP256}, true},
		// The X448 suite never leaves its ephemeral or classical half to TLS (spec 5.3): no
		// refusal, whatever the group.
		{"1024 over SecP384r1MLKEM1024", pqkex.X448MLKEM1024(), []tls.CurveID{tls.SecP384r1MLKEM1024}, false},
		{"1024 over X25519MLKEM768", pqkex.X448MLKEM1024(), []tls.CurveID{tls.X25519MLKEM768}, false},
		{"1024 over X25519", pqkex.X448MLKEM1024(), []tls.CurveID{tls.X25519}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, tt.suite)
			reg := prometheus.NewRegistry()
			ts := e.serveGroups(t, peerReporter(echoMux()), tt.groups, pqkex.WithChannelBinding(), pqkex.WithMetrics(reg))
			refusals := func(side string) float64 {
				return counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": side, "reason": "tls_not_pq"})
			}
			handshakes := func(result string) float64 {
				return counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "server", "result": result})
			}
			want := 0.0
			if tt.fallback {
				want = 1
			}
			// Two clients, one after the other: the server keeps serving after a refusal.
			for i := 1.0; i <= 2; i++ {
				hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithChannelBinding(), pqkex.WithMetrics(reg))
				for range 2 { // the second call uses the session of the first
					c := connect.NewClient[str, str](hc, ts.URL+procUnary)
					resp, err := c.CallUnary(context.Background(), connect.NewRequest(strMsg("x")))
					if err != nil {
						t.Fatal(err)
					}
					if resp.Msg.Value != "echo:x" || resp.Header().Get("X-Bound") != "true" {
						t.Fatalf("response %q, X-Bound %q", resp.Msg.Value, resp.Header().Get("X-Bound"))
					}
				}
				if got := refusals("server"); got != want*i {
					t.Errorf("client %v: server counted %v tls_not_pq refusals, want %v", i, got, want*i)
				}
				if got := refusals("client"); got != want*i {
					t.Errorf("client %v: client counted %v tls_not_pq refusals, want %v", i, got, want*i)
				}
				if ok, failed := handshakes("ok"), handshakes("error"); ok != i || failed != want*i {
					t.Errorf("client %v: server handshakes ok %v, error %v; want %v, %v", i, ok, failed, i, want*i)
				}
			}
		})
	}
}

// curveLiar reports another TLS group in responses than the connection negotiated, as a
// client on another TLS connection than the server's would see.
type curveLiar struct {
	base  http.RoundTripper
	group tls.CurveID
}

func (l curveLiar) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := l.base.RoundTrip(r)
	if err == nil && resp.TLS != nil {
		cs := *resp.TLS
		cs.CurveID = l.group
		resp.TLS = &cs
	}
	return resp, err
}

// TestTLSEphemeralClientChecksItsConnection: when the server accepted a hello without a
// pqkex ephemeral, a client whose own TLS connection is not post-quantum fails the handshake
// (permission_denied) and does not retry without it.
func TestTLSEphemeralClientChecksItsConnection(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	reg := prometheus.NewRegistry()
	ts := e.startServer(t, echoMux(), pqkex.WithChannelBinding(), pqkex.WithMetrics(reg))
	hc, _ := e.httpClient(t, curveLiar{e.transport(t, clientID), tls.X25519}, pqkex.WithChannelBinding(), pqkex.WithMetrics(reg))
	err := unaryCall(hc, ts.URL)
	wantCode(t, err, connect.CodePermissionDenied)
	if !strings.Contains(err.Error(), "not post-quantum") {
		t.Errorf("error %q, want the client's own TLS check", err)
	}
	if got := counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "server", "result": "error"}); got != 0 {
		t.Errorf("server counted %v failed handshakes, want 0 (it accepted)", got)
	}
	if got := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "client", "reason": "tls_not_pq"}); got != 0 {
		t.Errorf("client counted %v tls_not_pq refusals, want 0", got)
	}
}

// helloFlagsSeen records the flags byte of every ClientHello a client sends.
type helloFlagsSeen struct {
	base  http.RoundTripper
	mu    sync.Mutex
	flags []byte
}

func (h *helloFlagsSeen) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Path == pqkex.HandshakePath && r.GetBody != nil {
		if body, err := r.GetBody(); err == nil {
			b, _ := io.ReadAll(body)
			if len(b) > 11 { // version, type, one version and one suite offered, u16 suite, u16 aead, then the flags
				h.mu.Lock()
				h.flags = append(h.flags, b[11])
				h.mu.Unlock()
			}
		}
	}
	return h.base.RoundTrip(r)
}

// TestRekeyBringsItsOwnEphemeral: only the first session of a TLS connection leaves its
// ephemeral to TLS; session rekeys, and Client.Handshake replacing a session on the same
// connection, send a pqkex ephemeral; Client.Handshake over a new connection does not need
// to (spec 6.5).
func TestRekeyBringsItsOwnEphemeral(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	ts := e.serveGroups(t, echoMux(), []tls.CurveID{tls.X25519MLKEM768}, pqkex.WithChannelBinding())
	seen := &helloFlagsSeen{base: e.transport(t, clientID)}
	hc, cli := e.httpClient(t, seen, pqkex.WithChannelBinding(), pqkex.WithRekeyPolicy(pqkex.RekeyPolicy{Calls: 2}))
	for range 4 { // two sessions of two calls, on one HTTP/2 connection
		if err := unaryCall(hc, ts.URL); err != nil {
			t.Fatal(err)
		}
	}
	if want := []byte{0x07, 0x03}; !bytes.Equal(seen.flags, want) {
		t.Fatalf("session rekey: ClientHello flags %x, want %x", seen.flags, want)
	}
	seen.flags = nil
	if err := cli.Handshake(context.Background(), seen, ts.URL); err != nil {
		t.Fatal(err)
	}
	if want := []byte{0x07, 0x03}; !bytes.Equal(seen.flags, want) {
		t.Fatalf("Handshake on the same connection: ClientHello flags %x, want %x", seen.flags, want)
	}
	other := &helloFlagsSeen{base: e.transport(t, clientID)} // another connection
	if err := cli.Handshake(context.Background(), other, ts.URL); err != nil {
		t.Fatal(err)
	}
	if want := []byte{0x07}; !bytes.Equal(other.flags, want) {
		t.Fatalf("Handshake on a new connection: ClientHello flags %x, want %x", other.flags, want)
	}
	if err := unaryCall(hc, ts.URL); err != nil { // the session works for calls
		t.Fatal(err)
	}
}
