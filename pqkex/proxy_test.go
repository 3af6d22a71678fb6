package pqkex_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"testing"

	"connectrpc.com/connect"
	"github.com/veilrpc/veil/pqkex"
)

const proxyID = "spiffe://example.org/proxy"

// recorder is the TLS-terminating proxy's upstream transport: it records every body and
// trailer it forwards, as a curious proxy could.
type recorder struct {
	base http.RoundTripper
	mu   sync.Mutex
	seen bytes.Buffer
}

type teeBody struct {
	io.ReadCloser
	r    *recorder
	resp *http.Response
}

func (t *teeBody) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	t.r.mu.Lock()
	t.r.seen.Write(p[:n])
	if err == io.EOF && t.resp != nil {
		for k, v := range t.resp.Trailer {
			t.r.seen.WriteString(k + ": " + v[0] + "\n")
		}
	}
	t.r.mu.Unlock()
	return n, err
}

func (r *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil {
		req.Body = &teeBody{ReadCloser: req.Body, r: r}
	}
	resp, err := r.base.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	resp.Body = &teeBody{ReadCloser: resp.Body, r: r, resp: resp}
	return resp, nil
}

func (r *recorder) contains(s string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Contains(r.seen.Bytes(), []byte(s))
}

func (e *env) startProxy(t *testing.T, backend string, director func(*http.Request)) (*httptest.Server, *recorder) {
	t.Helper()
	return e.startRewritingProxy(t, backend, director, nil)
}

// startRewritingProxy is startProxy whose proxy may also rewrite every response it forwards
// (modify, as httputil.ReverseProxy.ModifyResponse), as a hostile proxy could.
func (e *env) startRewritingProxy(t *testing.T, backend string, director func(*http.Request), modify func(*http.Response) error) (*httptest.Server, *recorder) {
	t.Helper()
	u, err := url.Parse(backend)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{base: e.transport(t, proxyID)}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(u)
			if director != nil {
				director(pr.Out)
			}
		},
		Transport:      rec,
		FlushInterval:  -1,
		ModifyResponse: modify,
	}
	// Like Envoy, the proxy forwards response headers at once; net/http's ReverseProxy would
	// hold them until the first body byte, which never comes for a trailers-only response.
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rp.ServeHTTP(headerFlusher{w}, r)
	})
	return e.serveTLS(t, proxyID, h), rec
}

func TestThroughTerminatingProxy(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, echoMux())
	proxy, rec := e.startProxy(t, backend.URL, nil)
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding(proxy.URL))
	const marker = "PLAINTEXT-MARKER-7f3a"
	for _, p := range protocols {
		out, errs := callAll(context.Background(), hc, proxy.URL, p.opts, marker)
		for k, err := range errs {
			t.Fatalf("%s %s through proxy: %v", p.name, k, err)
		}
		if out["unary"] != "echo:"+marker+"|"+clientID {
			t.Fatalf("%s unary through proxy = %q", p.name, out["unary"])
		}
		_, errs = callAll(context.Background(), hc, proxy.URL, p.opts, failMessage)
		for _, k := range []string{"unary", "client", "server", "bidi"} {
			if connect.CodeOf(errs[k]) != connect.CodeNotFound {
				t.Fatalf("%s %s error through proxy = %v", p.name, k, errs[k])
			}
		}
	}
	for _, secret := range []string{marker, "echo:", "secret-error-detail", failMessage} {
		if rec.contains(secret) {
			t.Errorf("the proxy saw %q in a forwarded body or trailer", secret)
		}
	}
	if !rec.contains("Grpc-Status") {
		t.Error("recorder saw no gRPC trailers; the test would not notice leaks in them")
	}
}

func TestProxyStrippingHeadersIsRefused(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, echoMux())
	proxy, _ := e.startProxy(t, backend.URL, func(r *http.Request) {
		r.Header.Del("Veil-Pqkex-Ticket")
		r.Header.Del("Veil-Pqkex-Session")
	})
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding())
	for _, p := range protocols {
		out, errs := callAll(context.Background(), hc, proxy.URL, p.opts, "hello")
		for _, k := range []string{"unary", "client", "server", "bidi"} {
			if connect.CodeOf(errs[k]) != connect.CodeDataLoss {
				t.Errorf("%s %s with stripped headers: out=%q err=%v, want data_loss (tampering)", p.name, k, out[k], errs[k])
			}
		}
	}
}

func TestChannelBinding(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, peerReporter(echoMux()), pqkex.WithChannelBinding())
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithChannelBinding())
	c := connect.NewClient[str, str](hc, ts.URL+procUnary)
	resp, err := c.CallUnary(context.Background(), connect.NewRequest(strMsg("x")))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Header().Get("X-Bound") != "true" {
		t.Fatalf("X-Bound = %q", resp.Header().Get("X-Bound"))
	}
	// A server that requires binding refuses a client that does not bind.
	plainClient, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding())
	wantRefusal(t, unaryCall(plainClient, ts.URL), "credential")
	// Through a terminating proxy, binding fails.
	backend := e.startServer(t, echoMux())
	proxy, _ := e.startProxy(t, backend.URL, nil)
	wantRefusal(t, unaryCall(hc, proxy.URL), "credential")
}

// peerReporter adds the pqkex peer's channel binding to response headers.
func peerReporter(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, _ := pqkex.PeerFromContext(r.Context())
		if p.ChannelBound {
			w.Header().Set("X-Bound", "true")
		}
		next.ServeHTTP(w, r)
	})
}

type headerFlusher struct{ http.ResponseWriter }

func (w headerFlusher) WriteHeader(code int) {
	w.ResponseWriter.WriteHeader(code)
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w headerFlusher) Unwrap() http.ResponseWriter { return w.ResponseWriter }
