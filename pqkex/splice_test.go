package pqkex_test

import (
	"bytes"
	"io"
	"net/http"
	"sync"
	"testing"

	"connectrpc.com/connect"

	"github.com/veilrpc/veil/pqkex"
)

// TestResponseSplicedFromAnotherCall: a proxy answers a call with the sealed response of an
// earlier call of the same session (status, headers and body as recorded). The s2c keys
// depend on the call ID (spec 5.2), so the client reports tampering.
func TestResponseSplicedFromAnotherCall(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
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
	e := newEnv(t, pqkex.X25519MLKEM768())
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
	e := newEnv(t, pqkex.X25519MLKEM768())
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
