package pqkex_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/pqkex/pqkextest"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	serverID = "spiffe://example.org/server"
	clientID = "spiffe://example.org/client"

	procUnary   = "/test.v1.EchoService/Unary"
	procClient  = "/test.v1.EchoService/ClientStream"
	procServer  = "/test.v1.EchoService/ServerStream"
	procBidi    = "/test.v1.EchoService/Bidi"
	failMessage = "fail-with-secret-detail"
)

type str = wrapperspb.StringValue

// echoMux serves the four RPC kinds. Every handler checks the pqkex peer and reports it in
// a response header, and answers failMessage with a NotFound error carrying a secret.
func echoMux() *http.ServeMux {
	mux := http.NewServeMux()
	peerOf := func(ctx context.Context) string {
		p, ok := pqkex.PeerFromContext(ctx)
		if !ok {
			return "none"
		}
		return p.SPIFFEID
	}
	fail := func() error {
		err := connect.NewError(connect.CodeNotFound, errors.New("secret-error-detail"))
		err.Meta().Set("X-Secret-Trailer", "trailer-secret")
		return err
	}
	mux.Handle(procUnary, connect.NewUnaryHandler(procUnary, func(ctx context.Context, r *connect.Request[str]) (*connect.Response[str], error) {
		if r.Msg.Value == failMessage {
			return nil, fail()
		}
		resp := connect.NewResponse(wrapperspb.String("echo:" + r.Msg.Value))
		resp.Header().Set("X-Peer", peerOf(ctx))
		return resp, nil
	}))
	mux.Handle(procClient, connect.NewClientStreamHandler(procClient, func(ctx context.Context, s *connect.ClientStream[str]) (*connect.Response[str], error) {
		var parts []string
		for s.Receive() {
			if s.Msg().Value == failMessage {
				return nil, fail()
			}
			parts = append(parts, s.Msg().Value)
		}
		if err := s.Err(); err != nil {
			return nil, err
		}
		resp := connect.NewResponse(wrapperspb.String(strings.Join(parts, "+")))
		resp.Header().Set("X-Peer", peerOf(ctx))
		return resp, nil
	}))
	mux.Handle(procServer, connect.NewServerStreamHandler(procServer, func(ctx context.Context, r *connect.Request[str], s *connect.ServerStream[str]) error {
		if r.Msg.Value == failMessage {
			return fail()
		}
		s.ResponseHeader().Set("X-Peer", peerOf(ctx))
		for i := range 3 {
			if err := s.Send(wrapperspb.String(r.Msg.Value + "#" + string(rune('0'+i)))); err != nil {
				return err
			}
		}
		return nil
	}))
	mux.Handle(procBidi, connect.NewBidiStreamHandler(procBidi, func(ctx context.Context, s *connect.BidiStream[str, str]) error {
		s.ResponseHeader().Set("X-Peer", peerOf(ctx))
		for {
			m, err := s.Receive()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			if m.Value == failMessage {
				return fail()
			}
			if err := s.Send(wrapperspb.String("echo:" + m.Value)); err != nil {
				return err
			}
		}
	}))
	return mux
}

// env is a CA, a server identity and a client identity.
type env struct {
	ca     *pqkextest.CA
	server *pqkex.Identity
	client *pqkex.Identity
}

var testNow = time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)

func fixedClock() time.Time { return testNow }

func newEnv(t testing.TB, suite pqkex.Scheme) *env {
	t.Helper()
	ca, err := pqkextest.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	nb, na := testNow.Add(-time.Hour), testNow.Add(24*time.Hour)
	s, err := ca.Identity(suite, serverID, nb, na, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ca.Identity(suite, clientID, nb, na, nil)
	if err != nil {
		t.Fatal(err)
	}
	return &env{ca: ca, server: s, client: c}
}

// clock is a settable test clock.
type clock struct{ now time.Time }

func (c *clock) Now() time.Time { return c.now }

// startServer serves next behind a pqkex server over HTTP/2 mTLS.
func (e *env) startServer(t testing.TB, next http.Handler, opts ...pqkex.ServerOption) *httptest.Server {
	t.Helper()
	opts = append([]pqkex.ServerOption{pqkex.WithIdentity(e.server), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock)}, opts...)
	srv, err := pqkex.NewServer(opts...)
	if err != nil {
		t.Fatal(err)
	}
	return e.serveTLS(t, serverID, srv.Handler(next))
}

func (e *env) serveTLS(t testing.TB, id string, h http.Handler) *httptest.Server {
	t.Helper()
	ts := httptest.NewUnstartedServer(h)
	ts.EnableHTTP2 = true
	cfg, err := e.ca.ServerTLSConfig(id)
	if err != nil {
		t.Fatal(err)
	}
	ts.TLS = cfg
	ts.StartTLS()
	t.Cleanup(ts.Close)
	return ts
}

// transport is an HTTP/2 mTLS transport for the workload id.
func (e *env) transport(t testing.TB, id string) *http.Transport {
	t.Helper()
	cfg, err := e.ca.ClientTLSConfig(id)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	return tr
}

// httpClient returns an HTTP client that seals with pqkex over base.
func (e *env) httpClient(t testing.TB, base http.RoundTripper, opts ...pqkex.Option) (*http.Client, *pqkex.Client) {
	t.Helper()
	opts = append([]pqkex.Option{pqkex.WithIdentity(e.client), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock), pqkex.WithAuthorizer(pqkex.AuthorizeID(serverID))}, opts...)
	c, err := pqkex.NewClient(opts...)
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Transport: c.RoundTripper(base)}, c
}

var protocols = []struct {
	name string
	opts []connect.ClientOption
}{
	{"connect", nil},
	{"grpc", []connect.ClientOption{connect.WithGRPC()}},
	{"grpcweb", []connect.ClientOption{connect.WithGRPCWeb()}},
}

// callAll runs one call of each kind with message msg and returns the responses joined.
func callAll(ctx context.Context, hc *http.Client, base string, opts []connect.ClientOption, msg string) (map[string]string, map[string]error) {
	return callKinds(ctx, hc, base, opts, msg, true)
}

// callKinds is callAll, optionally without the bidi call (which needs HTTP/2).
func callKinds(ctx context.Context, hc *http.Client, base string, opts []connect.ClientOption, msg string, bidi bool) (map[string]string, map[string]error) {
	out, errs := map[string]string{}, map[string]error{}
	unary := connect.NewClient[str, str](hc, base+procUnary, opts...)
	if r, err := unary.CallUnary(ctx, connect.NewRequest(wrapperspb.String(msg))); err != nil {
		errs["unary"] = err
	} else {
		out["unary"] = r.Msg.Value + "|" + r.Header().Get("X-Peer")
	}

	cs := connect.NewClient[str, str](hc, base+procClient, opts...).CallClientStream(ctx)
	for _, m := range []string{"a", msg, "c"} {
		if cs.Send(wrapperspb.String(m)) != nil {
			break
		}
	}
	if r, err := cs.CloseAndReceive(); err != nil {
		errs["client"] = err
	} else {
		out["client"] = r.Msg.Value + "|" + r.Header().Get("X-Peer")
	}

	ss, err := connect.NewClient[str, str](hc, base+procServer, opts...).CallServerStream(ctx, connect.NewRequest(wrapperspb.String(msg)))
	if err != nil {
		errs["server"] = err
	} else {
		var got []string
		for ss.Receive() {
			got = append(got, ss.Msg().Value)
		}
		if err := ss.Err(); err != nil {
			errs["server"] = err
		} else {
			out["server"] = strings.Join(got, ",") + "|" + ss.ResponseHeader().Get("X-Peer")
		}
		_ = ss.Close()
	}

	if !bidi {
		return out, errs
	}
	bs := connect.NewClient[str, str](hc, base+procBidi, opts...).CallBidiStream(ctx)
	var got []string
	var berr error
	for _, m := range []string{"x", msg} {
		if berr = bs.Send(wrapperspb.String(m)); berr != nil {
			if errors.Is(berr, io.EOF) {
				_, berr = bs.Receive()
			}
			break
		}
		r, err := bs.Receive()
		if err != nil {
			berr = err
			break
		}
		got = append(got, r.Value)
	}
	if berr == nil {
		berr = bs.CloseRequest()
	}
	if berr == nil {
		if _, err := bs.Receive(); !errors.Is(err, io.EOF) {
			berr = err
		}
	}
	_ = bs.CloseResponse()
	if berr != nil && !errors.Is(berr, io.EOF) {
		errs["bidi"] = berr
	} else {
		out["bidi"] = strings.Join(got, ",") + "|" + bs.ResponseHeader().Get("X-Peer")
	}
	return out, errs
}

func counter(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue metric
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

var _ = tls.VersionTLS13

func strMsg(s string) *str { return wrapperspb.String(s) }

// sharedTicketKeys draws one ticket key and returns a function that makes a TicketKeys
// holding it: what replicas sharing their ticket keys each hold.
func sharedTicketKeys(t testing.TB) func() *pqkex.TicketKeys {
	t.Helper()
	k, err := pqkex.GenerateTicketKey(1, nil)
	if err != nil {
		t.Fatal(err)
	}
	return func() *pqkex.TicketKeys {
		tk, err := pqkex.NewTicketKeys(k)
		if err != nil {
			t.Fatal(err)
		}
		return tk
	}
}
