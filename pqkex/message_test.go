package pqkex_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"connectrpc.com/connect"
	"github.com/veilrpc/veil/pqkex"
	"google.golang.org/protobuf/types/known/structpb"
)

// The attacks of this file are those of the proxy promise (spec sections 2, 6.1, 8, 9): a
// proxy that rewrites what it forwards in clear must never change what either side acts on.
// Each is detected as tampering (data_loss) or has no effect; none surfaces as a code a
// handler could have returned.

const procList = "/test.v1.ListService/List"

// listEntries is the size of listMux's answer: 2,048 entries of exactly 64 encoded bytes,
// 128 KiB in all, so that 64 KiB of it is exactly 1,024 whole entries and still parses.
const listEntries = 2048

// listMux answers procList with listEntries strings whose encodings are 64 bytes each.
func listMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle(procList, connect.NewUnaryHandler(procList, func(context.Context, *connect.Request[str]) (*connect.Response[structpb.ListValue], error) {
		l := &structpb.ListValue{}
		for range listEntries {
			l.Values = append(l.Values, structpb.NewStringValue(strings.Repeat("e", 60)))
		}
		return connect.NewResponse(l), nil
	}))
	return mux
}

// TestTruncationThroughProxy is finding 1 of the review: a recording proxy marks a sealed
// response above 64 KiB as trailers-only, which the client used to trust, reading one frame
// and returning half of the answer as a success. Now the client acts only on sealed framing
// and the forged header changes nothing; cutting the body after its first frame is tampering.
func TestTruncationThroughProxy(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, listMux())
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding()) // through TLS-terminating proxies
	call := func(base string, opts []connect.ClientOption) (int, error) {
		c := connect.NewClient[str, structpb.ListValue](hc, base+procList, opts...)
		resp, err := c.CallUnary(context.Background(), connect.NewRequest(strMsg("all")))
		if err != nil {
			return 0, err
		}
		return len(resp.Msg.Values), nil
	}
	forged, _ := e.startRewritingProxy(t, backend.URL, nil, func(r *http.Response) error {
		if r.Header.Get("Veil-Pqkex-Sealed") != "" {
			r.Header.Set("Veil-Pqkex-Trailers-Only", "1")
		}
		return nil
	})
	cut, _ := e.startRewritingProxy(t, backend.URL, nil, func(r *http.Response) error {
		if r.Header.Get("Veil-Pqkex-Sealed") != "" && r.Request.URL.Path == procList {
			r.Body = struct {
				io.Reader
				io.Closer
			}{io.LimitReader(r.Body, 16+9+64<<10+16), r.Body} // the nonce and the first data frame
			r.Header.Del("Content-Length")
			r.ContentLength = -1
		}
		return nil
	})
	for _, p := range protocols {
		n, err := call(backend.URL, p.opts)
		if err != nil || n != listEntries {
			t.Fatalf("%s direct: %d entries, %v", p.name, n, err)
		}
		// A forged Trailers-Only header is not part of the sealed message: no effect.
		if n, err := call(forged.URL, p.opts); err != nil || n != listEntries {
			t.Errorf("%s with a forged Trailers-Only header: %d entries, err %v; want all %d", p.name, n, err, listEntries)
		}
		n, err = call(cut.URL, p.opts)
		if err == nil {
			t.Errorf("%s truncated after the first frame: a short success with %d of %d entries", p.name, n, listEntries)
			continue
		}
		if connect.CodeOf(err) != connect.CodeDataLoss {
			t.Errorf("%s truncated after the first frame: %v, want data_loss", p.name, err)
		}
	}
}

// headerSpy records the request headers each procedure's handler saw and adds a response
// header of the handler's own.
type headerSpy struct {
	mu   sync.Mutex
	seen map[string]http.Header
	next http.Handler
}

func (s *headerSpy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.seen[r.URL.Path] = r.Header.Clone()
	s.mu.Unlock()
	w.Header().Set("X-Resp", "from-handler")
	s.next.ServeHTTP(w, r)
}

// headerClient sets X-Req on every request before pqkex seals it and records the response
// headers pqkex hands back, per procedure.
type headerClient struct {
	base http.RoundTripper
	mu   sync.Mutex
	seen map[string]http.Header
}

func (c *headerClient) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("X-Req", "from-client")
	resp, err := c.base.RoundTrip(r)
	if err == nil {
		c.mu.Lock()
		c.seen[r.URL.Path] = resp.Header.Clone()
		c.mu.Unlock()
	}
	return resp, err
}

// TestProxyChangedHeadersNeverReachEitherSide is finding 5: a proxy that changes or adds
// request headers (an idempotency key, say) or response headers in clear. The handler sees
// only the headers the client sealed, the caller only those the handler sealed, for every
// RPC kind and protocol.
func TestProxyChangedHeadersNeverReachEitherSide(t *testing.T) {
	e := newEnv(t, testSuite(t))
	spy := &headerSpy{seen: map[string]http.Header{}, next: echoMux()}
	backend := e.startServer(t, spy)
	proxy, _ := e.startRewritingProxy(t, backend.URL, func(r *http.Request) {
		r.Header.Set("X-Req", "forged-by-proxy")
		r.Header.Set("X-Proxy-Added", "1")
	}, func(r *http.Response) error {
		r.Header.Set("X-Resp", "forged-by-proxy")
		r.Header.Set("X-Proxy-Resp", "1")
		return nil
	})
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding()) // through TLS-terminating proxies
	hcl := &headerClient{base: hc.Transport, seen: map[string]http.Header{}}
	hc.Transport = hcl
	for _, p := range protocols {
		out, errs := callAll(context.Background(), hc, proxy.URL, p.opts, "hello")
		for k, err := range errs {
			t.Fatalf("%s %s: %v", p.name, k, err)
		}
		if out["unary"] != "echo:hello|"+clientID {
			t.Fatalf("%s unary = %q", p.name, out["unary"])
		}
		for _, proc := range []string{procUnary, procClient, procServer, procBidi} {
			req, resp := spy.seen[proc], hcl.seen[proc]
			if got := req.Get("X-Req"); got != "from-client" {
				t.Errorf("%s %s: the handler saw X-Req %q, want the sealed from-client", p.name, proc, got)
			}
			if req.Get("X-Proxy-Added") != "" {
				t.Errorf("%s %s: a header the proxy added reached the handler", p.name, proc)
			}
			if got := resp.Get("X-Resp"); got != "from-handler" {
				t.Errorf("%s %s: the caller saw X-Resp %q, want the sealed from-handler", p.name, proc, got)
			}
			if resp.Get("X-Proxy-Resp") != "" {
				t.Errorf("%s %s: a header the proxy added reached the caller", p.name, proc)
			}
		}
	}
}

// TestProxyChangedContentTypeIsTampering: Content-Type travels in clear as a routing hint and
// sealed as the authoritative copy; a proxy that changes the clear one in either direction
// is detected as tampering, never handed to connect-go as a protocol error.
func TestProxyChangedContentTypeIsTampering(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, echoMux())
	reqCT, _ := e.startRewritingProxy(t, backend.URL, func(r *http.Request) {
		if isSealedCall(r) {
			r.Header.Set("Content-Type", "application/json")
		}
	}, nil)
	respCT, _ := e.startRewritingProxy(t, backend.URL, nil, func(r *http.Response) error {
		if r.Header.Get("Veil-Pqkex-Sealed") != "" {
			r.Header.Set("Content-Type", "application/json")
		}
		return nil
	})
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding()) // through TLS-terminating proxies
	for _, base := range []string{reqCT.URL, respCT.URL} {
		for _, p := range protocols {
			_, errs := callAll(context.Background(), hc, base, p.opts, "hello")
			for _, k := range []string{"unary", "client", "server", "bidi"} {
				if connect.CodeOf(errs[k]) != connect.CodeDataLoss {
					t.Errorf("%s %s with a changed Content-Type: %v, want data_loss", p.name, k, errs[k])
				}
			}
		}
	}
}

// TestForgedErrorHeader: a proxy answers a sealed call itself with a Veil-Pqkex-Error
// header. A refusal that only tampering can cause (a replay, a bad frame, a stripped ticket)
// is unauthenticated, so the client reports it as tampering; a refusal of the session (the
// only kind a server sends that the client acts on) is unavailable. Neither is ever the code
// the refusal's reason maps to on the server (already_exists, aborted, out_of_range...).
func TestForgedErrorHeader(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, echoMux())
	var mu sync.Mutex
	reason := ""
	proxy, _ := e.startRewritingProxy(t, backend.URL, nil, func(r *http.Response) error {
		mu.Lock()
		defer mu.Unlock()
		if reason == "" || r.Header.Get("Veil-Pqkex-Sealed") == "" {
			return nil
		}
		_ = r.Body.Close()
		r.StatusCode, r.Status = http.StatusConflict, "409 Conflict"
		r.Header = http.Header{"Veil-Pqkex-Error": {reason}, "Content-Type": {"application/json"}}
		r.Body = io.NopCloser(strings.NewReader(`{"code":"already_exists","message":"forged"}`))
		r.ContentLength = -1
		return nil
	})
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding()) // through TLS-terminating proxies
	if err := unaryCall(hc, proxy.URL); err != nil {                                  // the session, with no forgery
		t.Fatal(err)
	}
	for _, tc := range []struct {
		reason string
		code   connect.Code
	}{
		{"replayed", connect.CodeDataLoss},
		{"reordered", connect.CodeDataLoss},
		{"truncated", connect.CodeDataLoss},
		{"tampered", connect.CodeDataLoss},
		{"malformed", connect.CodeDataLoss},
		{"no_session", connect.CodeDataLoss},
		{"internal", connect.CodeDataLoss},
		{"not-a-reason", connect.CodeDataLoss},
		{"ticket_expired", connect.CodeUnavailable},
		{"unknown_ticket", connect.CodeUnavailable},
	} {
		mu.Lock()
		reason = tc.reason
		mu.Unlock()
		for _, p := range protocols {
			// Not bidi: httputil.ReverseProxy does not deliver a replaced response while
			// the bidi request is still open (the client's transport never receives it;
			// checked), so the call would wait for its deadline without reaching pqkex. A
			// bidi call meets a refusal in RoundTrip, where a client stream does.
			_, errs := callKinds(context.Background(), hc, proxy.URL, p.opts, "hello", false)
			for _, k := range []string{"unary", "client", "server"} {
				if connect.CodeOf(errs[k]) != tc.code {
					t.Errorf("forged %s, %s %s: %v, want %v", tc.reason, p.name, k, errs[k], tc.code)
				}
			}
		}
	}
}

// bigHeaderClient sets a large request header (a bearer token, say) before pqkex seals it.
type bigHeaderClient struct {
	base http.RoundTripper
	val  string
}

func (c *bigHeaderClient) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("X-Big", c.val)
	return c.base.RoundTrip(r)
}

// TestLargeSealedHead: a request head larger than a small body (an access token, say) is
// sealed whole and reaches the handler intact, whatever its size. A unary body sealed in
// place once overran a buffer sized for a head of at most 256 bytes: whether it did
// depended on how append rounded the buffer up, so the sizes sweep across that range.
func TestLargeSealedHead(t *testing.T) {
	e := newEnv(t, testSuite(t))
	spy := &headerSpy{seen: map[string]http.Header{}, next: echoMux()}
	backend := e.startServer(t, spy)
	hc, _ := e.httpClient(t, e.transport(t, clientID))
	bh := &bigHeaderClient{base: hc.Transport}
	hc.Transport = bh
	for _, p := range protocols {
		c := connect.NewClient[str, str](hc, backend.URL+procUnary, p.opts...)
		for size := 1; size <= 2048; size += 13 {
			bh.val = strings.Repeat("t", size)
			resp, err := c.CallUnary(context.Background(), connect.NewRequest(strMsg("hello")))
			if err != nil {
				t.Fatalf("%s with a %d-byte header: %v", p.name, size, err)
			}
			if resp.Msg.GetValue() != "echo:hello" {
				t.Fatalf("%s with a %d-byte header: %q", p.name, size, resp.Msg.GetValue())
			}
			if got := spy.seen[procUnary].Get("X-Big"); got != bh.val {
				t.Fatalf("%s: the handler saw X-Big of %d bytes, want %d", p.name, len(got), size)
			}
		}
	}
}
