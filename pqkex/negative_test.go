package pqkex_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/veilrpc/veil/pqkex"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func isSealedCall(r *http.Request) bool {
	return r.Header.Get("Veil-Pqkex-Ticket") != "" || r.Header.Get("Veil-Pqkex-Session") != ""
}

func unaryCall(hc *http.Client, base string, opts ...connect.ClientOption) error {
	c := connect.NewClient[str, str](hc, base+procUnary, opts...)
	_, err := c.CallUnary(context.Background(), connect.NewRequest(wrapperspb.String("hello")))
	return err
}

func clientStreamCall(hc *http.Client, base string, msgs ...string) error {
	cs := connect.NewClient[str, str](hc, base+procClient).CallClientStream(context.Background())
	for _, m := range msgs {
		if cs.Send(wrapperspb.String(m)) != nil {
			break
		}
	}
	_, err := cs.CloseAndReceive()
	return err
}

// wantRefusal checks a handshake refusal as a caller sees it: unavailable, whatever the
// server's reason, which the message names (the refusal is unauthenticated, spec 9).
func wantRefusal(t *testing.T, err error, reason string) {
	t.Helper()
	if connect.CodeOf(err) != connect.CodeUnavailable || err == nil || !strings.Contains(err.Error(), "(unauthenticated): "+reason) {
		t.Fatalf("error = %v, want unavailable naming the refusal %q", err, reason)
	}
}

func wantCode(t *testing.T, err error, code connect.Code) {
	t.Helper()
	if got := connect.CodeOf(err); got != code || err == nil {
		t.Fatalf("error = %v (code %v), want code %v", err, got, code)
	}
}

// TestAttacks runs each active attack of the threat model against a sealed call and checks
// the distinct code (spec section 9) and the rejection counter.
func TestAttacks(t *testing.T) {
	e := newEnv(t, testSuite(t))
	reg := prometheus.NewRegistry()
	ts := e.startServer(t, echoMux(), pqkex.WithMetrics(reg))
	m := &mitm{base: e.transport(t, clientID)}
	hc, _ := e.httpClient(t, m, pqkex.WithMetrics(reg))
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}

	onCall := func(f func([]byte) []byte) func(*http.Request, []byte) []byte {
		return func(r *http.Request, b []byte) []byte {
			if isSealedCall(r) {
				return f(b)
			}
			return b
		}
	}
	tests := []struct {
		name   string
		req    func(*http.Request, []byte) []byte
		resp   func(*http.Response, []byte) []byte
		stream bool
		msg    string
		code   connect.Code
		reason string
	}{
		{name: "flipped bit in hello frame", req: onCall(func(b []byte) []byte { return flip(b, 8+10) }), code: connect.CodeDataLoss, reason: "tampered"},
		// The call ID that starts the body selects the call keys: another ID fails the hello frame.
		{name: "changed call ID", req: onCall(func(b []byte) []byte { return flip(b, 7) }), code: connect.CodeDataLoss, reason: "tampered"},
		{name: "body shorter than a call ID", req: onCall(func(b []byte) []byte { return b[:5] }), code: connect.CodeDataLoss, reason: "truncated"},
		{name: "flipped bit in data frame", req: onCall(func(b []byte) []byte {
			f := callFrames(b)
			f[1] = flip(f[1], 12)
			return join(f...)
		}), code: connect.CodeDataLoss, reason: "tampered"},
		{name: "flipped final flag", req: onCall(func(b []byte) []byte {
			f := callFrames(b)
			f[len(f)-1] = flip(f[len(f)-1], 0)
			return join(f...)
		}), code: connect.CodeDataLoss, reason: "tampered"},
		{name: "truncated request", req: onCall(func(b []byte) []byte {
			f := callFrames(b)
			return join(f[:len(f)-1]...)
		}), code: connect.CodeDataLoss, reason: "truncated"},
		{name: "truncated mid-frame", req: onCall(func(b []byte) []byte { return b[:len(b)-3] }), code: connect.CodeDataLoss, reason: "truncated"},
		{name: "reordered frames", stream: true, req: onCall(func(b []byte) []byte {
			f := callFrames(b)
			f[1], f[2] = f[2], f[1]
			return join(f...)
		}), code: connect.CodeDataLoss, reason: "tampered"},
		{name: "replayed frame", stream: true, req: onCall(func(b []byte) []byte {
			f := callFrames(b)
			return join(append(f[:2:2], f[1:]...)...)
		}), code: connect.CodeDataLoss, reason: "tampered"},
		{name: "dropped frame", stream: true, req: onCall(func(b []byte) []byte {
			f := callFrames(b)
			return join(append(f[:1:1], f[2:]...)...)
		}), code: connect.CodeDataLoss, reason: "tampered"},
		// The sequence number is the frame's nonce and part of its authenticated header: a
		// flipped one fails authentication, whichever way it points (it is not classified
		// as a replay or a reordering before the frame authenticates).
		{name: "flipped sequence number in a request frame", stream: true, req: onCall(func(b []byte) []byte {
			f := callFrames(b)
			f[2] = flip(f[2], 4)
			return join(f...)
		}), code: connect.CodeDataLoss, reason: "tampered"},
		{name: "lowered sequence number in a request frame", stream: true, req: onCall(func(b []byte) []byte {
			f := callFrames(b)
			f[3] = flip(f[3], 4) // seq 3 -> 2, the number of the frame before it
			return join(f...)
		}), code: connect.CodeDataLoss, reason: "tampered"},
		{name: "flipped sequence number in a response frame", resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") == "" {
				return b
			}
			return flip(b, 16+4) // the first frame's seq, after the server nonce
		}, code: connect.CodeDataLoss},
		{name: "oversized length in a request frame", req: onCall(func(b []byte) []byte {
			b[8+5] = 0xff // the head frame's length, after the call ID: past 65552
			return b
		}), code: connect.CodeDataLoss, reason: "tampered"},
		{name: "undersized length in a response frame", resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") == "" {
				return b
			}
			copy(b[16+5:], []byte{0, 0, 0, 1}) // the head frame's length, after the server nonce: below the tag
			return b
		}, code: connect.CodeDataLoss},
		{name: "oversized length in a response frame", resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") == "" {
				return b
			}
			b[16+5] = 0xff
			return b
		}, code: connect.CodeDataLoss},
		{name: "call redirected to another procedure", req: func(r *http.Request, b []byte) []byte {
			if isSealedCall(r) {
				r.URL.Path = procServer
			}
			return b
		}, code: connect.CodeDataLoss, reason: "tampered"},
		{name: "flipped bit in response", resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") == "" {
				return b
			}
			return flip(b, 16+12) // in the first frame, after the server nonce
		}, code: connect.CodeDataLoss},
		{name: "truncated response", resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") == "" {
				return b
			}
			f := responseFrames(b)
			return join(f[:len(f)-1]...)
		}, code: connect.CodeDataLoss},
		// The server nonce that starts a response body selects the s2c keys: another nonce
		// fails the first frame (spec 6.2).
		{name: "changed server nonce", resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") == "" {
				return b
			}
			return flip(b, 5)
		}, code: connect.CodeDataLoss},
		{name: "response shorter than the server nonce", resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") == "" {
				return b
			}
			r.ContentLength = -1 // read frame by frame, not whole
			return b[:9]
		}, code: connect.CodeDataLoss},
		{name: "response shorter than the server nonce, known length", resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") == "" {
				return b
			}
			r.ContentLength = 9 // read whole
			return b[:9]
		}, code: connect.CodeDataLoss},
		{name: "stripped request headers", req: func(r *http.Request, b []byte) []byte {
			r.Header.Del("Veil-Pqkex-Ticket")
			r.Header.Del("Veil-Pqkex-Session")
			return b
		}, code: connect.CodeDataLoss, reason: "no_session"},
		// The clear status mirrors the sealed one for proxies; a changed one is tampering.
		{name: "success turned into error status", resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") != "" {
				r.StatusCode, r.Status = http.StatusServiceUnavailable, "503 Service Unavailable"
			}
			return b
		}, code: connect.CodeDataLoss},
		// An error turned into 200 would make connect-go parse the error body as a message:
		// the sealed status refuses it.
		{name: "error turned into 200", msg: failMessage, resp: func(r *http.Response, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Sealed") != "" {
				r.StatusCode, r.Status = http.StatusOK, "200 OK"
				r.Header.Set("Content-Type", "application/proto")
			}
			return b
		}, code: connect.CodeDataLoss},
		{name: "stripped response marker", resp: func(r *http.Response, b []byte) []byte {
			r.Header.Del("Veil-Pqkex-Sealed")
			return b
		}, code: connect.CodeDataLoss},
		{name: "garbage ticket", req: func(r *http.Request, b []byte) []byte {
			if isSealedCall(r) {
				r.Header.Del("Veil-Pqkex-Session")
				r.Header.Set("Veil-Pqkex-Ticket", "AAAA")
			}
			return b
		}, code: connect.CodeDataLoss, reason: "malformed"},
		// Unary calls after the first name their session by ID (spec 6.6).
		{name: "garbage session ID", req: func(r *http.Request, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Session") != "" {
				r.Header.Set("Veil-Pqkex-Session", "AAAA")
			}
			return b
		}, code: connect.CodeDataLoss, reason: "malformed"},
		{name: "ticket and session ID both", req: func(r *http.Request, b []byte) []byte {
			if r.Header.Get("Veil-Pqkex-Session") != "" {
				r.Header.Set("Veil-Pqkex-Ticket", "AAAA")
			}
			return b
		}, code: connect.CodeDataLoss, reason: "malformed"},
		{name: "modified ticket", req: func(r *http.Request, b []byte) []byte {
			if isSealedCall(r) {
				tk, err := base64.RawURLEncoding.DecodeString(r.Header.Get("Veil-Pqkex-Ticket"))
				if err != nil {
					panic(err)
				}
				r.Header.Set("Veil-Pqkex-Ticket", base64.RawURLEncoding.EncodeToString(flip(tk, 30)))
			}
			return b
			// A stream: a unary call would be resent once after a new handshake
			// (TestTickets), and the server would count two rejections.
		}, stream: true, code: connect.CodeUnavailable, reason: "unknown_ticket"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "server", "reason": tt.reason})
			m.set(tt.req, tt.resp)
			defer m.set(nil, nil)
			var err error
			if tt.stream {
				err = clientStreamCall(hc, ts.URL, "one", "two", "three")
			} else if tt.msg != "" {
				_, err = connect.NewClient[str, str](hc, ts.URL+procUnary).CallUnary(context.Background(), connect.NewRequest(strMsg(tt.msg)))
			} else {
				err = unaryCall(hc, ts.URL)
			}
			wantCode(t, err, tt.code)
			if tt.reason != "" {
				after := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "server", "reason": tt.reason})
				if after != before+1 {
					t.Errorf("server rejections{reason=%s} went %v -> %v, want +1", tt.reason, before, after)
				}
			}
		})
	}
	// After all of that the session still works.
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}
}

// TestAppendedFramesIgnored: frames after FINAL never reach the handler.
func TestAppendedFramesIgnored(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux())
	m := &mitm{base: e.transport(t, clientID)}
	hc, _ := e.httpClient(t, m)
	m.set(func(r *http.Request, b []byte) []byte {
		if !isSealedCall(r) {
			return b
		}
		f := callFrames(b)
		return join(append(f, f[1], f[1])...)
	}, nil)
	c := connect.NewClient[str, str](hc, ts.URL+procClient)
	cs := c.CallClientStream(context.Background())
	for _, s := range []string{"a", "b"} {
		if err := cs.Send(strMsg(s)); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := cs.CloseAndReceive()
	if err != nil {
		t.Fatal(err)
	}
	if resp.Msg.Value != "a+b" {
		t.Fatalf("handler saw %q, want a+b", resp.Msg.Value)
	}
}

// TestReplayedCall resends a recorded sealed call verbatim.
func TestReplayedCall(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux())
	base := e.transport(t, clientID)
	m := &mitm{base: base}
	hc, _ := e.httpClient(t, m)
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}
	rec := m.last()
	req, err := http.NewRequest(http.MethodPost, rec.url, bytes.NewReader(rec.body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = rec.header.Clone()
	resp, err := base.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if got := resp.Header.Get("Veil-Pqkex-Error"); got != "replayed" {
		t.Fatalf("replayed call: Veil-Pqkex-Error = %q, want replayed", got)
	}
	// The same with the short form (spec 6.6): the second call names its session by ID.
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}
	short := m.last()
	if short.header.Get("Veil-Pqkex-Session") == "" {
		t.Fatal("second unary call did not use the short form")
	}
	req, err = http.NewRequest(http.MethodPost, short.url, bytes.NewReader(short.body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = short.header.Clone()
	resp2, err := base.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp2.Body.Close()
	if got := resp2.Header.Get("Veil-Pqkex-Error"); got != "replayed" {
		t.Fatalf("replayed short-form call: Veil-Pqkex-Error = %q, want replayed", got)
	}
	// The connect-level view of the same attack: a middlebox that always sends the recorded call.
	m.set(func(r *http.Request, b []byte) []byte {
		if isSealedCall(r) {
			r.Header = rec.header.Clone()
			return rec.body
		}
		return b
	}, nil)
	wantCode(t, unaryCall(hc, ts.URL), connect.CodeDataLoss) // tampering, never the handler's already_exists
}

// TestReplayedCallToAnotherReplica resends a recorded sealed call verbatim to a second
// replica with the same ticket keys, over real connections: that replica's window never saw
// the call, so it runs it (spec 6.4), but answers under its own server nonce, so the two
// responses are sealed under different keys (TestReplayToAnotherReplica opens them).
func TestReplayedCallToAnotherReplica(t *testing.T) {
	e := newEnv(t, testSuite(t))
	shared := sharedTicketKeys(t)
	replicaA := e.startServer(t, echoMux(), pqkex.WithTicketKeys(shared()))
	replicaB := e.startServer(t, echoMux(), pqkex.WithTicketKeys(shared()))
	base := e.transport(t, clientID)
	m := &mitm{base: base}
	var respA []byte
	m.set(nil, func(r *http.Response, b []byte) []byte {
		if r.Header.Get("Veil-Pqkex-Sealed") != "" {
			respA = append([]byte(nil), b...)
		}
		return b
	})
	hc, _ := e.httpClient(t, m)
	if err := unaryCall(hc, replicaA.URL); err != nil {
		t.Fatal(err)
	}
	rec := m.last()
	u, err := url.Parse(rec.url)
	if err != nil {
		t.Fatal(err)
	}
	ub, _ := url.Parse(replicaB.URL)
	u.Host = ub.Host
	req, err := http.NewRequest(http.MethodPost, u.String(), bytes.NewReader(rec.body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = rec.header.Clone()
	resp, err := base.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	respB, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Veil-Pqkex-Sealed") != "1" {
		t.Fatalf("replica B: %s, Veil-Pqkex-Error %q", resp.Status, resp.Header.Get("Veil-Pqkex-Error"))
	}
	if len(respA) < 16+9 || len(respB) < 16+9 {
		t.Fatalf("response bodies of %d and %d bytes", len(respA), len(respB))
	}
	if bytes.Equal(respA[:16], respB[:16]) {
		t.Fatal("both replicas answered with the same server nonce")
	}
	fa, fb := responseFrames(respA), responseFrames(respB)
	if bytes.Equal(fa[0][16:], fb[0][16:]) {
		t.Fatal("both replicas sealed the same first frame: one key and nonce for one plaintext")
	}
}

func TestStrictRefusesPlaintextAndPermissiveAllows(t *testing.T) {
	e := newEnv(t, testSuite(t))
	reg := prometheus.NewRegistry()
	mode := func(p string) pqkex.Mode {
		if p == procServer {
			return pqkex.Permissive
		}
		return pqkex.Strict
	}
	ts := e.startServer(t, echoMux(), pqkex.WithProcedureMode(mode), pqkex.WithMetrics(reg))
	plain := &http.Client{Transport: e.transport(t, clientID)}
	for _, p := range protocols {
		wantCode(t, unaryCall(plain, ts.URL, p.opts...), connect.CodeUnauthenticated)
		ss, err := connect.NewClient[str, str](plain, ts.URL+procServer, p.opts...).CallServerStream(context.Background(), connect.NewRequest(wrapperspb.String("p")))
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for ss.Receive() {
			n++
		}
		if ss.Err() != nil || n != 3 || ss.ResponseHeader().Get("X-Peer") != "none" {
			t.Fatalf("%s permissive plaintext stream: n=%d err=%v peer=%q", p.name, n, ss.Err(), ss.ResponseHeader().Get("X-Peer"))
		}
	}
	if got := counter(t, reg, "veil_pqkex_calls_total", map[string]string{"side": "server", "sealed": "false"}); got != 3 {
		t.Errorf("plaintext calls counted = %v, want 3", got)
	}
	if got := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "server", "reason": "no_session"}); got != 3 {
		t.Errorf("no_session rejections = %v, want 3", got)
	}
}

// TestModeDefaultsAreStrict: a nil WithProcedureMode and a Mode value that is not
// Permissive refuse plaintext calls, as the zero value does.
func TestModeDefaultsAreStrict(t *testing.T) {
	e := newEnv(t, testSuite(t))
	plain := &http.Client{Transport: e.transport(t, clientID)}
	for name, opt := range map[string]pqkex.ServerOption{
		"nil procedure mode": pqkex.WithProcedureMode(nil),
		"unknown mode":       pqkex.WithMode(pqkex.Mode(7)),
		"zero mode":          pqkex.WithMode(pqkex.Mode(0)),
	} {
		ts := e.startServer(t, echoMux(), opt)
		for _, p := range protocols {
			if err := unaryCall(plain, ts.URL, p.opts...); connect.CodeOf(err) != connect.CodeUnauthenticated {
				t.Errorf("%s, %s: plaintext call: %v, want unauthenticated", name, p.name, err)
			}
		}
	}
}

func TestIdentityChecks(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux())
	t.Run("client expects another server", func(t *testing.T) {
		hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithAuthorizer(pqkex.AuthorizeID("spiffe://example.org/other")))
		wantCode(t, unaryCall(hc, ts.URL), connect.CodePermissionDenied)
	})
	t.Run("server refuses the client", func(t *testing.T) {
		ts := e.startServer(t, echoMux(), pqkex.WithAuthorizer(pqkex.AuthorizeID("spiffe://example.org/someone-else")))
		hc, _ := e.httpClient(t, e.transport(t, clientID))
		wantRefusal(t, unaryCall(hc, ts.URL), "credential")
	})
	t.Run("expired client credential", func(t *testing.T) {
		late := func() time.Time { return testNow.Add(48 * time.Hour) }
		ts := e.startServer(t, echoMux(), pqkex.WithClock(late))
		hc, _ := e.httpClient(t, e.transport(t, clientID))
		wantRefusal(t, unaryCall(hc, ts.URL), "credential")
	})
	t.Run("expired server credential", func(t *testing.T) {
		late := func() time.Time { return testNow.Add(48 * time.Hour) }
		hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithClock(late))
		wantCode(t, unaryCall(hc, ts.URL), connect.CodePermissionDenied)
	})
	t.Run("credential from another CA", func(t *testing.T) {
		other := newEnv(t, testSuite(t))
		hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithIdentity(other.client))
		wantRefusal(t, unaryCall(hc, ts.URL), "credential")
	})
	t.Run("suite mismatch", func(t *testing.T) {
		id, err := e.ca.Identity(pqkex.X448MLKEM1024(), clientID, testNow.Add(-time.Hour), testNow.Add(time.Hour), nil)
		if err != nil {
			t.Fatal(err)
		}
		hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithIdentity(id))
		wantCode(t, unaryCall(hc, ts.URL), connect.CodeUnimplemented)
	})
}

func TestTickets(t *testing.T) {
	e := newEnv(t, testSuite(t))
	shared := sharedTicketKeys(t)
	clk := &clock{now: testNow}
	replicaA := e.startServer(t, echoMux(), pqkex.WithTicketKeys(shared()), pqkex.WithClock(clk.Now), pqkex.WithTicketLifetime(time.Minute))
	replicaB := e.startServer(t, echoMux(), pqkex.WithTicketKeys(shared()), pqkex.WithClock(clk.Now))
	otherService := e.startServer(t, echoMux())

	var target string // host to send sealed calls to instead of replica A
	m := &mitm{base: e.transport(t, clientID)}
	m.set(func(r *http.Request, b []byte) []byte {
		if target != "" && isSealedCall(r) {
			u, _ := url.Parse(target)
			r.URL.Host = u.Host
			r.Host = u.Host
		}
		return b
	}, nil)
	reg := prometheus.NewRegistry()
	hc, _ := e.httpClient(t, m, pqkex.WithMetrics(reg))
	handshakes := func() float64 {
		return counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "client", "result": "ok"})
	}
	if err := unaryCall(hc, replicaA.URL); err != nil {
		t.Fatal(err)
	}
	if err := unaryCall(hc, replicaA.URL); err != nil {
		t.Fatal(err)
	}
	if handshakes() != 1 {
		t.Fatalf("handshakes = %v, want 1 (the second call reuses the session)", handshakes())
	}

	rejected := func(reason string) float64 {
		return counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "client", "reason": reason})
	}
	// Stateless resumption on another replica with the same ticket keys. The call names
	// the session by ID (replica A said it holds it), replica B does not hold it, and the
	// client resends the call with the ticket (spec 6.6); B then holds it too.
	target = replicaB.URL
	for range 2 {
		if err := unaryCall(hc, replicaA.URL); err != nil {
			t.Fatalf("replica B did not continue the session: %v", err)
		}
	}
	if handshakes() != 1 || rejected("unknown_session") != 1 {
		t.Fatalf("handshakes %v, unknown_session rejections %v; want 1 and 1", handshakes(), rejected("unknown_session"))
	}
	// A server with other ticket keys refuses the ticket. A stream sees the refusal
	// as unavailable (an unauthenticated session refusal, spec 9); a unary call is resent once after a new handshake, which here
	// is refused again since every sealed call still goes to that server.
	target = otherService.URL
	wantCode(t, clientStreamCall(hc, replicaA.URL, "a", "b"), connect.CodeUnavailable)
	wantCode(t, unaryCall(hc, replicaA.URL), connect.CodeUnavailable)
	if handshakes() != 3 || rejected("unknown_ticket") != 3 {
		t.Fatalf("handshakes %v, unknown_ticket rejections %v; want 3 and 3", handshakes(), rejected("unknown_ticket"))
	}
	target = ""
	if err := unaryCall(hc, replicaA.URL); err != nil { // the client handshakes again
		t.Fatal(err)
	}
	if handshakes() != 4 {
		t.Fatalf("handshakes = %v, want 4", handshakes())
	}
	// An expired ticket is refused with its own code; the unary call is resent after
	// a new handshake and succeeds without the caller seeing the refusal.
	clk.now = testNow.Add(2 * time.Minute) // replica A's tickets live one minute
	if err := unaryCall(hc, replicaA.URL); err != nil {
		t.Fatalf("unary call after the ticket expired: %v", err)
	}
	if handshakes() != 5 || rejected("ticket_expired") != 1 {
		t.Fatalf("handshakes %v, ticket_expired rejections %v; want 5 and 1", handshakes(), rejected("ticket_expired"))
	}
	clk.now = testNow.Add(4 * time.Minute)
	wantCode(t, clientStreamCall(hc, replicaA.URL, "a"), connect.CodeUnavailable) // a session refusal, never the handler-like deadline_exceeded (spec 9)
}

func TestTicketKeyRotation(t *testing.T) {
	k1, _ := pqkex.GenerateTicketKey(1, nil)
	k2, _ := pqkex.GenerateTicketKey(2, nil)
	k3, _ := pqkex.GenerateTicketKey(3, nil)
	e := newEnv(t, testSuite(t))
	keys, err := pqkex.NewTicketKeys(k1)
	if err != nil {
		t.Fatal(err)
	}
	ts := e.startServer(t, echoMux(), pqkex.WithTicketKeys(keys))
	hc, _ := e.httpClient(t, e.transport(t, clientID))
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}
	if err := keys.Rotate(k2); err != nil {
		t.Fatal(err)
	}
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatalf("ticket under the previous key refused: %v", err)
	}
	if err := keys.Rotate(k3); err != nil {
		t.Fatal(err)
	}
	// k1 left the set: its ticket is refused, visibly for a stream; a unary call is
	// resent after a new handshake.
	wantCode(t, clientStreamCall(hc, ts.URL, "a"), connect.CodeUnavailable)
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatalf("unary call after its ticket key left the set: %v", err)
	}
	if err := keys.Rotate(k3); err == nil {
		t.Fatal("rotating to the current key ID succeeded")
	}
	if keys.CurrentID() != 3 {
		t.Fatalf("CurrentID = %d", keys.CurrentID())
	}
}

func TestCompressionRefused(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux())
	hc, _ := e.httpClient(t, e.transport(t, clientID))
	for _, p := range protocols {
		err := unaryCall(hc, ts.URL, append(p.opts, connect.WithSendGzip(), connect.WithCompressMinBytes(1))...)
		wantCode(t, err, connect.CodeInvalidArgument)
		if !strings.Contains(err.Error(), "compressed") {
			t.Errorf("%s: %v", p.name, err)
		}
	}
}

// TestIntermediaryErrorsAreUnavailable: a proxy's 502/503/504 in place of a sealed
// response is the upstream being gone (unavailable), while any other unsealed answer
// is refused as a downgrade.
func TestIntermediaryErrorsAreUnavailable(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux())
	status := 0
	m := &mitm{base: e.transport(t, clientID)}
	hc, _ := e.httpClient(t, m)
	if err := unaryCall(hc, ts.URL); err != nil { // establish the session
		t.Fatal(err)
	}
	m.set(nil, func(r *http.Response, b []byte) []byte {
		if status != 0 {
			r.StatusCode = status
			r.Header.Del("Veil-Pqkex-Sealed")
		}
		return b
	})
	defer m.set(nil, nil)
	for _, tc := range []struct {
		status int
		code   connect.Code
	}{
		{http.StatusBadGateway, connect.CodeUnavailable},
		{http.StatusServiceUnavailable, connect.CodeUnavailable},
		{http.StatusGatewayTimeout, connect.CodeUnavailable},
		{http.StatusOK, connect.CodeDataLoss},
	} {
		status = tc.status
		wantCode(t, clientStreamCall(hc, ts.URL, "x"), tc.code)
	}
}

// TestShortForm: unary calls name their session by ID once the server said it holds the
// session; streams always carry the ticket; a server that does not hold the session refuses
// the short form and the call is resent with the ticket, unseen by the caller (spec 6.6).
func TestShortForm(t *testing.T) {
	e := newEnv(t, testSuite(t))
	reg := prometheus.NewRegistry()
	ts := e.startServer(t, echoMux(), pqkex.WithMetrics(reg))
	m := &mitm{base: e.transport(t, clientID)}
	hc, _ := e.httpClient(t, m, pqkex.WithMetrics(reg))
	form := func() string {
		h := m.last().header
		switch {
		case h.Get("Veil-Pqkex-Ticket") != "" && h.Get("Veil-Pqkex-Session") == "":
			return "ticket"
		case h.Get("Veil-Pqkex-Session") != "" && h.Get("Veil-Pqkex-Ticket") == "":
			return "session"
		}
		return "?"
	}
	for i, want := range []string{"ticket", "session", "session"} {
		if err := unaryCall(hc, ts.URL); err != nil {
			t.Fatal(err)
		}
		if got := form(); got != want {
			t.Fatalf("unary call %d sent the %s form, want %s", i, got, want)
		}
	}
	if err := clientStreamCall(hc, ts.URL, "a", "b"); err != nil {
		t.Fatal(err)
	}
	if got := form(); got != "ticket" {
		t.Fatalf("stream sent the %s form, want ticket", got)
	}
	// A session ID the server does not hold: refused, resent with the ticket.
	m.set(func(r *http.Request, b []byte) []byte {
		if r.Header.Get("Veil-Pqkex-Session") != "" {
			r.Header.Set("Veil-Pqkex-Session", base64.RawURLEncoding.EncodeToString([]byte("0123456789abcdef")))
		}
		return b
	}, nil)
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatalf("call after unknown_session: %v", err)
	}
	if got := form(); got != "ticket" {
		t.Fatalf("resent call sent the %s form, want ticket", got)
	}
	for _, side := range []string{"server", "client"} {
		if got := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": side, "reason": "unknown_session"}); got != 1 {
			t.Errorf("%s unknown_session rejections = %v, want 1", side, got)
		}
	}
	m.set(nil, nil)
	if got := counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "client", "result": "ok"}); got != 1 {
		t.Fatalf("handshakes = %v, want 1", got)
	}
}
