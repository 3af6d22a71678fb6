package pqkex_test

import (
	"context"
	"net/http"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
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
