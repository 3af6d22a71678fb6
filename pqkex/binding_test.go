package pqkex_test

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/veilrpc/veil/pqkex"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const otherServiceID = "spiffe://example.org/other-service"

// redirector is a proxy that forwards the pqkex endpoints to the service the client asked
// for but, once told to, sends every call to another service.
type redirector struct {
	base     http.RoundTripper
	to       *url.URL
	redirect atomic.Bool
}

func (p *redirector) RoundTrip(r *http.Request) (*http.Response, error) {
	if p.redirect.Load() && r.URL.Path != pqkex.CredentialPath && r.URL.Path != pqkex.HandshakePath {
		r = r.Clone(r.Context())
		r.URL.Scheme, r.URL.Host, r.Host = p.to.Scheme, p.to.Host, p.to.Host
	}
	return p.base.RoundTrip(r)
}

// TestRedirectToAnotherService is the redirect attack of finding 2: a client that expects
// service A (AuthorizeID) makes a session with A; a proxy then delivers its calls to service
// B, which the same CA certifies and which shares A's ticket key (one deployment). B must
// not answer the call (it cannot open a ticket made for A) and the client must not accept
// anything from B.
func TestRedirectToAnotherService(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	other, err := e.ca.Identity(e.server.Credential().Suite(), otherServiceID, testNow.Add(-time.Hour), testNow.Add(24*time.Hour), nil)
	if err != nil {
		t.Fatal(err)
	}
	keys := sharedTicketKeys(t)
	var ranOnB atomic.Int64
	muxB := http.NewServeMux()
	muxB.Handle(procUnary, connect.NewUnaryHandler(procUnary, func(ctx context.Context, r *connect.Request[str]) (*connect.Response[str], error) {
		ranOnB.Add(1)
		return connect.NewResponse(wrapperspb.String("from B")), nil
	}))
	a := e.startServer(t, echoMux(), pqkex.WithTicketKeys(keys()))
	srvB, err := pqkex.NewServer(pqkex.WithIdentity(other), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock), pqkex.WithTicketKeys(keys()))
	if err != nil {
		t.Fatal(err)
	}
	b := e.serveTLS(t, otherServiceID, srvB.Handler(muxB))
	bURL, _ := url.Parse(b.URL)
	proxy := &redirector{base: e.transport(t, clientID), to: bURL}
	hc, _ := e.httpClient(t, proxy, pqkex.WithAuthorizer(pqkex.AuthorizeID(serverID)))
	unary := connect.NewClient[str, str](hc, a.URL+procUnary)
	if r, err := unary.CallUnary(context.Background(), connect.NewRequest(strMsg("hi"))); err != nil || r.Msg.Value != "echo:hi" {
		t.Fatalf("call to A: %v %v", r, err)
	}
	proxy.redirect.Store(true)
	r, err := unary.CallUnary(context.Background(), connect.NewRequest(strMsg("hi")))
	if err == nil {
		t.Fatalf("the client accepted an answer from service B: %q", r.Msg.Value)
	}
	if n := ranOnB.Load(); n != 0 {
		t.Fatalf("service B ran the call meant for A %d times", n)
	}
}

// A client must name the server it expects (spec 4.2): without WithAuthorizer it refuses to
// start unless told to accept any, and every session made that way is counted.
func TestClientNeedsExpectedServer(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	if _, err := pqkex.NewClient(pqkex.WithIdentity(e.client), pqkex.WithRoots(e.ca.Roots())); err == nil {
		t.Fatal("a client without an expected server identity started")
	}
	if _, err := pqkex.NewClient(pqkex.WithIdentity(e.client), pqkex.WithRoots(e.ca.Roots()), pqkex.WithAuthorizer(nil)); err == nil {
		t.Fatal("a client with a nil authorizer started")
	}
	ts := e.startServer(t, echoMux())
	reg := prometheus.NewRegistry()
	c, err := pqkex.NewClient(pqkex.WithIdentity(e.client), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock),
		pqkex.InsecureAcceptAnyServer(), pqkex.WithMetrics(reg))
	if err != nil {
		t.Fatal(err)
	}
	base := e.transport(t, clientID)
	if err := unaryCall(&http.Client{Transport: c.RoundTripper(base)}, ts.URL); err != nil {
		t.Fatal(err)
	}
	if n := counter(t, reg, "veil_pqkex_insecure_sessions_total", map[string]string{"side": "client"}); n != 1 {
		t.Fatalf("insecure sessions counted: %v, want 1", n)
	}
	// A round tripper's own expectation applies on top of the client's, to new and to
	// existing sessions alike.
	wrong := &http.Client{Transport: c.RoundTripper(base, pqkex.ExpectServer(pqkex.AuthorizeID(otherServiceID)))}
	wantCode(t, unaryCall(wrong, ts.URL), connect.CodePermissionDenied)
	c2, err := pqkex.NewClient(pqkex.WithIdentity(e.client), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock), pqkex.InsecureAcceptAnyServer())
	if err != nil {
		t.Fatal(err)
	}
	wantCode(t, unaryCall(&http.Client{Transport: c2.RoundTripper(base, pqkex.ExpectServer(pqkex.AuthorizeID(otherServiceID)))}, ts.URL), connect.CodePermissionDenied)
	right := &http.Client{Transport: c2.RoundTripper(base, pqkex.ExpectServer(pqkex.AuthorizeID(serverID)))}
	if err := unaryCall(right, ts.URL); err != nil {
		t.Fatal(err)
	}
}

// Clients bind to the TLS channel by default (spec 4.2), and Peer.ChannelBound is true only
// for calls on the connection the session was bound to (spec 7.3): the same session's ticket
// on a new connection is served, and reported as not bound.
func TestChannelBoundOnlyOnItsConnection(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	ts := e.startServer(t, peerReporter(echoMux()))
	tr := e.transport(t, clientID)
	reg := prometheus.NewRegistry()
	hc, _ := e.httpClient(t, tr, pqkex.WithMetrics(reg))
	bound := func() string {
		t.Helper()
		c := connect.NewClient[str, str](hc, ts.URL+procUnary)
		resp, err := c.CallUnary(context.Background(), connect.NewRequest(strMsg("x")))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Header().Get("X-Bound")
	}
	for i := range 2 { // the second answer comes from the server's per-connection memo
		if got := bound(); got != "true" {
			t.Fatalf("first connection, call %d: X-Bound = %q, want true (binding is the default)", i, got)
		}
	}
	tr.CloseIdleConnections()
	for i := range 2 {
		if got := bound(); got != "" {
			t.Fatalf("another connection, call %d: X-Bound = %q, want not bound", i, got)
		}
	}
	if n := counter(t, reg, "veil_pqkex_handshakes_total", map[string]string{"side": "client", "result": "ok"}); n != 1 {
		t.Fatalf("%v handshakes, want 1 (the session continues on the new connection)", n)
	}
}

// In-stream rekeys from the client are sealed to the server's static key of the session's
// handshake; after the server's credential rotates they still decapsulate (finding 6).
func TestStreamRekeyAfterServerRotation(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	src := &rotatingIdentity{id: e.server}
	policy := pqkex.WithRekeyPolicy(pqkex.RekeyPolicy{Stream: pqkex.StreamRekeyPolicy{Bytes: 200}})
	reg := prometheus.NewRegistry()
	ts := e.startServer(t, echoMux(), pqkex.WithIdentity(src), policy, pqkex.WithMetrics(reg))
	hc, _ := e.httpClient(t, e.transport(t, clientID), policy)
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}
	src.rotate(t, e)
	bs := connect.NewClient[str, str](hc, ts.URL+procBidi).CallBidiStream(context.Background())
	for i := range 6 {
		msg := strings.Repeat(string(rune('a'+i)), 100)
		if err := bs.Send(strMsg(msg)); err != nil {
			t.Fatal(err)
		}
		got, err := bs.Receive()
		if err != nil || got.Value != "echo:"+msg {
			t.Fatalf("message %d after the server's rotation: %v %v", i, got, err)
		}
	}
	_ = bs.CloseRequest()
	_ = bs.CloseResponse()
	if n := counter(t, reg, "veil_pqkex_rekeys_total", map[string]string{"side": "server", "kind": "stream"}); n == 0 {
		t.Fatal("the server made no stream rekey; the test did not exercise one")
	}
}

// TestConcurrencyBeyondReplayWindow: a proxy holds a session's first call back until more
// calls than the replay window (1,024) have completed after it, as a legitimate queue of
// concurrent calls can. The late call must still be served: the client never lets a call
// ID run a window ahead of an unanswered one (it starts a new session instead), so the
// server's window never mistakes it for a replay (spec 6.4).
func TestConcurrencyBeyondReplayWindow(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	reg := prometheus.NewRegistry()
	ts := e.startServer(t, echoMux(), pqkex.WithMetrics(reg))
	held, release := make(chan struct{}), make(chan struct{})
	var once atomic.Bool
	m := &mitm{base: e.transport(t, clientID)}
	m.onRequest = func(r *http.Request, body []byte) []byte {
		if r.URL.Path == procUnary && len(body) >= 8 && string(body[:8]) == "\x00\x00\x00\x00\x00\x00\x00\x00" && once.CompareAndSwap(false, true) {
			close(held)
			<-release
		}
		return body
	}
	hc, _ := e.httpClient(t, m)
	late := make(chan error, 1)
	go func() { late <- unaryCall(hc, ts.URL) }()
	<-held
	for i := range 1100 {
		if err := unaryCall(hc, ts.URL); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	close(release)
	if err := <-late; err != nil {
		t.Fatalf("the held call, answered after 1,100 later ones: %v", err)
	}
	if n := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "server", "reason": "replayed"}); n != 0 {
		t.Fatalf("%v calls refused as replays", n)
	}
}
