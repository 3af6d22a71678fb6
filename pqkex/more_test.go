package pqkex_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/veilrpc/veil/pqkex"
)

// TestConcurrentCalls shares one session between many goroutines: call IDs reach the server
// out of order and must all be accepted once.
func TestConcurrentCalls(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux())
	hc, _ := e.httpClient(t, e.transport(t, clientID))
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for range 16 {
		wg.Go(func() {
			for range 8 {
				if err := unaryCall(hc, ts.URL); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// TestHTTP1 runs every kind over HTTP/1.1 (Connect and gRPC-Web; gRPC needs HTTP/2).
func TestHTTP1(t *testing.T) {
	e := newEnv(t, testSuite(t))
	srv, err := pqkex.NewServer(pqkex.WithIdentity(e.server), pqkex.WithRoots(e.ca.Roots()), pqkex.WithClock(fixedClock))
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(srv.Handler(echoMux()))
	ts.TLS, err = e.ca.ServerTLSConfig(serverID)
	if err != nil {
		t.Fatal(err)
	}
	ts.TLS.NextProtos = []string{"http/1.1"}
	ts.StartTLS()
	t.Cleanup(ts.Close)
	cfg, err := e.ca.ClientTLSConfig(clientID)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: cfg, TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}
	t.Cleanup(tr.CloseIdleConnections)
	hc, _ := e.httpClient(t, tr)
	for _, p := range []int{0, 2} {
		out, errs := callKinds(context.Background(), hc, ts.URL, protocols[p].opts, "h1", false)
		for _, k := range []string{"unary", "client", "server"} {
			if errs[k] != nil || out[k] == "" {
				t.Errorf("%s %s over HTTP/1.1: %q %v", protocols[p].name, k, out[k], errs[k])
			}
		}
	}
}

// TestHandlersNeverNegotiateCompression: the handler sees no accept-encoding header, so
// connect-go never compresses a response that pqkex would then seal.
func TestHandlersNeverNegotiateCompression(t *testing.T) {
	e := newEnv(t, testSuite(t))
	var offered atomic.Int32
	check := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for _, h := range []string{"Accept-Encoding", "Connect-Accept-Encoding", "Grpc-Accept-Encoding"} {
			if r.Header.Get(h) != "" {
				offered.Add(1)
			}
		}
		echoMux().ServeHTTP(w, r)
	})
	ts := e.startServer(t, check)
	hc, _ := e.httpClient(t, e.transport(t, clientID))
	for _, p := range protocols {
		if _, errs := callAll(context.Background(), hc, ts.URL, p.opts, "x"); len(errs) != 0 {
			t.Fatal(errs)
		}
	}
	if offered.Load() != 0 {
		t.Fatalf("handlers saw %d accept-encoding headers", offered.Load())
	}
}

// rotatingIdentity is an IdentitySource whose identity can be swapped.
type rotatingIdentity struct {
	mu sync.Mutex
	id *pqkex.Identity
}

// rotate replaces the identity with a new one for serverID from e's CA.
func (r *rotatingIdentity) rotate(t *testing.T, e *env) {
	t.Helper()
	next, err := e.ca.Identity(testSuite(t), serverID, testNow.Add(-time.Hour), testNow.Add(time.Hour), nil)
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	r.id = next
	r.mu.Unlock()
}

func (r *rotatingIdentity) GetIdentity() (*pqkex.Identity, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.id, nil
}

// TestServerCredentialRotation: after the server's credential changes, a client that cached
// the old one gets server_key, fetches the new credential and succeeds on its next handshake.
func TestServerCredentialRotation(t *testing.T) {
	e := newEnv(t, testSuite(t))
	src := &rotatingIdentity{id: e.server}
	ts := e.startServer(t, echoMux(), pqkex.WithIdentity(src))
	clk := &clock{now: testNow}
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithClock(clk.Now), pqkex.WithRekeyPolicy(pqkex.RekeyPolicy{Age: time.Minute}))
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}
	src.rotate(t, e)
	// The old session's ticket still opens: tickets do not depend on the static key.
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}
	clk.now = clk.now.Add(2 * time.Minute) // force a new handshake
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatalf("handshake after rotation: %v", err)
	}
}

func TestNewServerAndClientNeedIdentityAndRoots(t *testing.T) {
	e := newEnv(t, testSuite(t))
	for i, opts := range [][]pqkex.Option{
		nil,
		{pqkex.WithIdentity(e.server)},
		{pqkex.WithRoots(e.ca.Roots())},
	} {
		sopts := make([]pqkex.ServerOption, len(opts))
		for j, o := range opts {
			sopts[j] = o
		}
		if _, err := pqkex.NewServer(sopts...); err == nil {
			t.Errorf("case %d: NewServer succeeded", i)
		}
		if _, err := pqkex.NewClient(opts...); err == nil {
			t.Errorf("case %d: NewClient succeeded", i)
		}
	}
	if _, err := pqkex.NewClient(pqkex.WithIdentity(e.client), pqkex.WithRoots(e.ca.Roots()), pqkex.WithAEAD(pqkex.AEAD(9))); err == nil {
		t.Error("NewClient accepted an unknown AEAD")
	}
}

func TestChaCha20Poly1305(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux(), pqkex.WithMode(pqkex.Strict))
	hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithAEAD(pqkex.ChaCha20Poly1305))
	out, errs := callAll(context.Background(), hc, ts.URL, nil, "cc")
	if len(errs) != 0 || out["bidi"] != "echo:x,echo:cc|"+clientID {
		t.Fatalf("%v %v", out, errs)
	}
	if got := fmt.Sprint(pqkex.ChaCha20Poly1305, " ", pqkex.AES256GCM); got != "ChaCha20-Poly1305 AES-256-GCM" {
		t.Fatal(got)
	}
}

// TestHandlerSeesPlaintextOnlyAfterAuthentication: a call whose hello frame does not
// authenticate, or whose ticket is forged, never reaches the handler; sealed calls that do
// reach it carry no pqkex headers.
func TestHandlerSeesPlaintextOnlyAfterAuthentication(t *testing.T) {
	e := newEnv(t, testSuite(t))
	var calls, leaked atomic.Int32
	counting := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.Header.Get("Veil-Pqkex-Ticket") != "" || r.Header.Get("Veil-Pqkex-Session") != "" {
			leaked.Add(1)
		}
		echoMux().ServeHTTP(w, r)
	})
	ts := e.startServer(t, counting, pqkex.WithMode(pqkex.Permissive))
	m := &mitm{base: e.transport(t, clientID)}
	hc, _ := e.httpClient(t, m)
	if err := unaryCall(hc, ts.URL); err != nil {
		t.Fatal(err)
	}
	if calls.Load() != 1 || leaked.Load() != 0 {
		t.Fatalf("calls=%d leaked headers=%d", calls.Load(), leaked.Load())
	}
	m.set(func(r *http.Request, b []byte) []byte {
		if isSealedCall(r) {
			return flip(b, 8+12) // inside the hello frame's ciphertext (after the call ID)
		}
		return b
	}, nil)
	wantCode(t, unaryCall(hc, ts.URL), connect.CodeDataLoss)
	m.set(func(r *http.Request, b []byte) []byte {
		if isSealedCall(r) {
			r.Header.Del("Veil-Pqkex-Session")
			r.Header.Set("Veil-Pqkex-Ticket", strings.Repeat("A", 64))
		}
		return b
	}, nil)
	// Even in PERMISSIVE mode a call that claims a session is never passed on in plaintext.
	wantCode(t, unaryCall(hc, ts.URL), connect.CodeUnavailable)
	if calls.Load() != 1 {
		t.Fatalf("handler ran %d times, want 1", calls.Load())
	}
}

func TestClientRefusesGET(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux())
	hc, _ := e.httpClient(t, e.transport(t, clientID))
	resp, err := hc.Get(ts.URL + procUnary)
	if err == nil {
		resp.Body.Close()
		t.Fatal("GET was sent")
	}
	wantCode(t, err, connect.CodeInvalidArgument)
}

// TestCancellationKeepsItsCode: when the client cancels a stream, the handler sees canceled,
// not a pqkex error: transport failures pass through the unsealing reader unchanged.
func TestCancellationKeepsItsCode(t *testing.T) {
	e := newEnv(t, testSuite(t))
	got := make(chan error, 1)
	received := make(chan struct{})
	mux := http.NewServeMux()
	mux.Handle(procClient, connect.NewClientStreamHandler(procClient, func(ctx context.Context, s *connect.ClientStream[str]) (*connect.Response[str], error) {
		for s.Receive() {
			close(received)
		}
		got <- s.Err()
		return nil, s.Err()
	}))
	ts := e.startServer(t, mux)
	hc, _ := e.httpClient(t, e.transport(t, clientID))
	ctx, cancel := context.WithCancel(context.Background())
	cs := connect.NewClient[str, str](hc, ts.URL+procClient).CallClientStream(ctx)
	if err := cs.Send(strMsg("one")); err != nil {
		t.Fatal(err)
	}
	<-received
	cancel()
	select {
	case err := <-got:
		if code := connect.CodeOf(err); code != connect.CodeCanceled {
			t.Fatalf("handler saw %v (code %v), want canceled", err, code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("handler did not see the cancellation")
	}
}

func TestIdentityAndCredentialChecks(t *testing.T) {
	e := newEnv(t, testSuite(t))
	suite := pqkex.X25519MLKEM768()
	pub, priv, err := pqkex.GenerateKey(suite, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, otherPriv, err := pqkex.GenerateKey(suite, nil)
	if err != nil {
		t.Fatal(err)
	}
	nb := testNow.Add(-time.Hour)
	cred, err := pqkex.IssueCredential(e.ca.PQ, e.ca.Classical, suite, clientID, nb, testNow.Add(time.Hour), pub)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pqkex.NewIdentity(cred, otherPriv); err == nil {
		t.Error("identity with another key's private half accepted")
	}
	if _, err := pqkex.NewIdentity(cred, priv[:len(priv)-1]); err == nil {
		t.Error("truncated private key accepted")
	}
	id, err := pqkex.NewIdentity(cred, priv)
	if err != nil {
		t.Fatal(err)
	}
	c := id.Credential()
	if c.SPIFFEID() != clientID || !c.NotBefore().Equal(nb) || string(c.PublicKey()) != string(pub) || len(c.Bytes()) != len(cred) {
		t.Error("credential accessors disagree with what was issued")
	}
	for name, issue := range map[string]func() ([]byte, error){
		"bad SPIFFE ID": func() ([]byte, error) {
			return pqkex.IssueCredential(e.ca.PQ, e.ca.Classical, suite, "https://example.org", nb, testNow, pub)
		},
		"empty validity": func() ([]byte, error) {
			return pqkex.IssueCredential(e.ca.PQ, e.ca.Classical, suite, clientID, testNow, testNow, pub)
		},
		"key of another suite": func() ([]byte, error) {
			return pqkex.IssueCredential(e.ca.PQ, e.ca.Classical, pqkex.X448MLKEM1024(), clientID, nb, testNow, pub)
		},
		"classical key as PQ CA": func() ([]byte, error) {
			return pqkex.IssueCredential(e.ca.Classical, e.ca.Classical, suite, clientID, nb, testNow, pub)
		},
		"PQ key as classical CA": func() ([]byte, error) {
			return pqkex.IssueCredential(e.ca.PQ, e.ca.PQ, suite, clientID, nb, testNow, pub)
		},
	} {
		if _, err := issue(); err == nil {
			t.Errorf("%s: issued", name)
		}
	}
}

// TestUnaryBodySizes: unary bodies sealed whole arrive intact whether they are empty, fit
// one frame (sealed in place) or span several 64 KiB frames, with rekeys due or not.
func TestUnaryBodySizes(t *testing.T) {
	e := newEnv(t, testSuite(t))
	ts := e.startServer(t, echoMux())
	for _, policy := range []pqkex.RekeyPolicy{{}, {Stream: pqkex.StreamRekeyPolicy{Bytes: 1000}}} {
		hc, _ := e.httpClient(t, e.transport(t, clientID), pqkex.WithRekeyPolicy(policy))
		c := connect.NewClient[str, str](hc, ts.URL+procUnary)
		for _, n := range []int{0, 1, 1000, 64<<10 - 8, 64 << 10, 200 << 10} {
			msg := strings.Repeat("v", n)
			resp, err := c.CallUnary(context.Background(), connect.NewRequest(strMsg(msg)))
			if err != nil {
				t.Fatalf("%d bytes, rekey %+v: %v", n, policy, err)
			}
			if resp.Msg.Value != "echo:"+msg {
				t.Fatalf("%d bytes, rekey %+v: echo of %d bytes", n, policy, len(resp.Msg.Value))
			}
		}
	}
}
