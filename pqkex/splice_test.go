package pqkex_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"sync"
	"testing"

	"connectrpc.com/connect"

	"github.com/veilrpc/veil/pqkex"
)

// TestResponseSplicedFromAnotherCall: a proxy answers a call with the sealed response of an
// earlier call of the same session (status, headers and body as recorded). The s2c keys
// depend on the call ID (spec 5.2), so the client reports tampering.
func TestResponseSplicedFromAnotherCall(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, echoMux())
	var mu sync.Mutex
	var saved *http.Response
	var savedBody []byte
	splice := false
	proxy, _ := e.startRewritingProxy(t, backend.URL, nil, func(r *http.Response) error {
		mu.Lock()
		defer mu.Unlock()
		if r.Header.Get("Veil-Pqkex-Sealed") == "" {
			return nil
		}
		body, err := io.ReadAll(r.Body)
		_ = r.Body.Close()
		if err != nil {
			return err
		}
		if saved == nil {
			saved, savedBody = &http.Response{StatusCode: r.StatusCode, Status: r.Status, Header: r.Header.Clone()}, body
		}
		if splice {
			r.StatusCode, r.Status, r.Header = saved.StatusCode, saved.Status, saved.Header.Clone()
			body = savedBody
		}
		r.Body, r.ContentLength = io.NopCloser(bytes.NewReader(body)), int64(len(body))
		return nil
	})
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding())
	if err := unaryCall(hc, proxy.URL); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	splice = true
	mu.Unlock()
	for _, p := range protocols {
		if err := unaryCall(hc, proxy.URL, p.opts...); connect.CodeOf(err) != connect.CodeDataLoss {
			t.Errorf("%s: spliced response: %v, want data_loss", p.name, err)
		}
	}
}

// TestReflectedRequestIsNotAResponse: a proxy sends the client's own sealed request body
// back as the response (with the marker and a matching status). Directions have separate
// keys (spec 5.2): tampering.
func TestReflectedRequestIsNotAResponse(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, echoMux())
	var mu sync.Mutex
	reflect := false
	var reqBody []byte
	rt := roundTripperFunc(func(r *http.Request) (*http.Response, error) {
		mu.Lock()
		on := reflect
		mu.Unlock()
		if !on || r.Header.Get("Veil-Pqkex-Ticket")+r.Header.Get("Veil-Pqkex-Session") == "" {
			return e.transport(t, clientID).RoundTrip(r)
		}
		b, _ := io.ReadAll(r.Body)
		reqBody = b
		return &http.Response{StatusCode: 200, Status: "200 OK", Proto: "HTTP/2.0", ProtoMajor: 2,
			Header:        http.Header{"Veil-Pqkex-Sealed": {"1"}, "Content-Type": r.Header["Content-Type"]},
			Body:          io.NopCloser(bytes.NewReader(b)),
			ContentLength: int64(len(b)), Request: r}, nil
	})
	hc, _ := e.httpClient(t, rt)
	if err := unaryCall(hc, backend.URL); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	reflect = true
	mu.Unlock()
	if err := unaryCall(hc, backend.URL); connect.CodeOf(err) != connect.CodeDataLoss || len(reqBody) == 0 {
		t.Errorf("reflected request as response: %v, want data_loss", err)
	}
}

// TestProxyChangedQueryIsTampering: the query is part of the sealed :path (spec 6.3); a
// proxy that adds or changes it is detected before the handler runs.
func TestProxyChangedQueryIsTampering(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, echoMux())
	proxy, _ := e.startProxy(t, backend.URL, func(r *http.Request) {
		if r.Header.Get("Veil-Pqkex-Ticket")+r.Header.Get("Veil-Pqkex-Session") != "" {
			r.URL.RawQuery = "admin=1"
		}
	})
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding())
	if err := unaryCall(hc, proxy.URL); connect.CodeOf(err) != connect.CodeDataLoss {
		t.Errorf("changed query: %v, want data_loss", err)
	}
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// rstBody passes n bytes of a sealed response body and then fails as net/http's HTTP/2
// transport does when the peer resets the stream with code: a proxy can pick the code.
type rstBody struct {
	io.ReadCloser
	n    int
	code string
}

func (b *rstBody) Read(p []byte) (int, error) {
	if b.n <= 0 {
		return 0, errors.New("stream error: stream ID 3; " + b.code + "; received from peer")
	}
	p = p[:min(len(p), b.n)]
	n, err := b.ReadCloser.Read(p)
	b.n -= n
	return n, err
}

// TestProxyResetIsNeverAHandlerCode: a proxy resets the HTTP/2 stream, choosing the error
// code (ENHANCE_YOUR_CALM, INADEQUATE_SECURITY, INTERNAL_ERROR, which connect-go maps to
// resource_exhausted, permission_denied and internal). Before any response or mid-response
// it is a dropped call, unavailable, as a replica dying mid-stream is (spec 6.2, 9); the
// reset's code never reaches the caller. (A body that ends cleanly before its FINAL frame
// is truncated, data_loss: TestTruncationThroughProxy.)
func TestProxyResetIsNeverAHandlerCode(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, echoMux())
	base := e.transport(t, clientID)
	var mu sync.Mutex
	code, cut := "", 0 // cut < 0: reset before the response
	rt := roundTripperFunc(func(r *http.Request) (*http.Response, error) {
		mu.Lock()
		code, cut := code, cut
		mu.Unlock()
		sealed := r.Header.Get("Veil-Pqkex-Ticket")+r.Header.Get("Veil-Pqkex-Session") != ""
		if sealed && code != "" && cut < 0 {
			return nil, &url.Error{Op: "Post", URL: r.URL.String(), Err: errors.New("stream error: stream ID 3; " + code + "; received from peer")}
		}
		resp, err := base.RoundTrip(r)
		if err == nil && sealed && code != "" {
			resp.Body = &rstBody{ReadCloser: resp.Body, n: cut, code: code}
		}
		return resp, err
	})
	hc, _ := e.httpClient(t, rt)
	if err := unaryCall(hc, backend.URL); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "INTERNAL_ERROR"} {
		for _, at := range []struct {
			cut  int
			want connect.Code
		}{{-1, connect.CodeUnavailable}, {0, connect.CodeUnavailable}, {40, connect.CodeUnavailable}} {
			mu.Lock()
			code, cut = c, at.cut
			mu.Unlock()
			for _, p := range protocols {
				_, errs := callKinds(context.Background(), hc, backend.URL, p.opts, "hello", false)
				for k, err := range errs {
					if connect.CodeOf(err) != at.want {
						t.Errorf("%s after %d bytes, %s %s: %v, want %v", c, at.cut, p.name, k, err, at.want)
					}
				}
			}
		}
	}
}

// TestProxyAddedRequestTrailersNeverReachTheHandler: request trailers a proxy adds to a
// sealed call (HTTP/2 allows them) are not part of the sealed message; the handler never
// sees them (spec 8: headers added by intermediaries reach neither side).
func TestProxyAddedRequestTrailersNeverReachTheHandler(t *testing.T) {
	e := newEnv(t, testSuite(t))
	seen := make(chan http.Header, 1)
	backend := e.startServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		seen <- r.Trailer.Clone()
	}))
	base := e.transport(t, clientID)
	rt := roundTripperFunc(func(r *http.Request) (*http.Response, error) {
		if r.Header.Get("Veil-Pqkex-Ticket") != "" {
			r.Trailer = http.Header{"X-Injected": {"by-proxy"}}
			r.ContentLength = -1 // trailers need a body of unknown length
		}
		return base.RoundTrip(r)
	})
	hc, _ := e.httpClient(t, rt)
	resp, err := hc.Post(backend.URL+procUnary, "application/proto", bytes.NewReader([]byte("hello")))
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if got := <-seen; len(got) != 0 {
		t.Errorf("handler saw request trailers a proxy added: %v", got)
	}
}

// trailerForger sets forged trailers on a proxied response when its body ends, as a proxy
// that rewrites gRPC's grpc-status would.
type trailerForger struct {
	io.ReadCloser
	resp *http.Response
}

func (f *trailerForger) Read(p []byte) (int, error) {
	n, err := f.ReadCloser.Read(p)
	if errors.Is(err, io.EOF) {
		for k, v := range forgedTrailers {
			f.resp.Trailer[k] = v
		}
	}
	return n, err
}

var forgedTrailers = http.Header{"Grpc-Status": {"7"}, "Grpc-Message": {"forged"}, "X-Secret-Trailer": {"forged"}}

// TestProxyChangedTrailersNeverReachTheCaller: a proxy adds or replaces the clear trailers of
// a unary response (gRPC's grpc-status mirror among them). The caller sees the sealed
// trailers only (spec 8): a successful call stays successful, a handler's error keeps its
// code and metadata.
func TestProxyChangedTrailersNeverReachTheCaller(t *testing.T) {
	e := newEnv(t, testSuite(t))
	backend := e.startServer(t, echoMux())
	proxy, _ := e.startRewritingProxy(t, backend.URL, nil, func(r *http.Response) error {
		if r.Header.Get("Veil-Pqkex-Sealed") == "" {
			return nil
		}
		if r.Trailer == nil {
			r.Trailer = http.Header{}
		}
		for k := range forgedTrailers {
			r.Trailer[k] = []string{""} // announced, so the proxy forwards them
		}
		r.Body = &trailerForger{ReadCloser: r.Body, resp: r}
		return nil
	})
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithoutChannelBinding())
	for _, p := range protocols {
		c := connect.NewClient[str, str](hc, proxy.URL+procUnary, p.opts...)
		if r, err := c.CallUnary(context.Background(), connect.NewRequest(strMsg("hello"))); err != nil || r.Msg.Value != "echo:hello" {
			t.Errorf("%s: %v, want echo:hello", p.name, err)
		}
		_, err := c.CallUnary(context.Background(), connect.NewRequest(strMsg(failMessage)))
		var ce *connect.Error
		if !errors.As(err, &ce) || ce.Code() != connect.CodeNotFound || ce.Meta().Get("X-Secret-Trailer") != "trailer-secret" {
			t.Errorf("%s: %v, want the handler's not_found and its metadata", p.name, err)
		}
	}
}
