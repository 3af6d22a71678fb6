package rpc_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"connectrpc.com/grpcreflect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/echo"
	"github.com/veilrpc/veil/transport"
)

const (
	serverID = "spiffe://example.org/echo"
	clientID = "spiffe://example.org/ns/prod/sa/client"
	echoProc = "/veil.echo.v1.EchoService/Echo"
)

// testEcho is the echo service plus hooks: "whoami" answers with the verified peer,
// "panic" panics, "block" waits for the call's context or release.
type testEcho struct {
	echo.Service
	release chan struct{}
}

func (e *testEcho) Echo(ctx context.Context, req *connect.Request[echov1.EchoRequest]) (*connect.Response[echov1.EchoResponse], error) {
	switch req.Msg.GetMessage() {
	case "whoami":
		p, ok := rpc.PeerFromContext(ctx)
		if !ok {
			return nil, errors.New("no peer")
		}
		msg := fmt.Sprintf("%s %s pq=%v", p.ID, p.TLSGroup, p.PostQuantum())
		if p.Sealed {
			msg += fmt.Sprintf(" sealed=true bound=%v", p.ChannelBound)
		}
		return connect.NewResponse(&echov1.EchoResponse{Message: msg}), nil
	case "panic":
		panic("handler bug")
	case "block":
		select {
		case <-ctx.Done():
			return nil, connect.NewError(connect.CodeDeadlineExceeded, ctx.Err())
		case <-e.release:
			return connect.NewResponse(&echov1.EchoResponse{Message: "released"}), nil
		}
	}
	return e.Service.Echo(ctx, req)
}

type env struct {
	ca     *pki.CA
	dir    string
	url    string
	server *rpc.Server
	impl   *testEcho
	cancel context.CancelFunc
	done   chan error
	copts  []rpc.ClientOption // the transport's client options (see transports)
}

func identity(t *testing.T, ca *pki.CA, dir, id string) transport.Source {
	t.Helper()
	out := filepath.Join(dir, strings.NewReplacer("spiffe://", "", "/", "_").Replace(id))
	if err := ca.IssueFiles(spiffeid.RequireFromString(id), out, time.Hour); err != nil {
		t.Fatal(err)
	}
	src, err := transport.LoadFiles(out)
	if err != nil {
		t.Fatal(err)
	}
	return src
}

func start(t *testing.T, opts ...rpc.ServerOption) *env {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	return startWith(t, dir, ca, opts...)
}

func startWith(t *testing.T, dir string, ca *pki.CA, opts ...rpc.ServerOption) *env {
	t.Helper()
	policy := rpc.NewPolicy().MustAllow("/veil.echo.v1.EchoService/*", "spiffe://example.org/ns/*/sa/*")
	srv, err := rpc.NewServer(identity(t, ca, dir, serverID), append([]rpc.ServerOption{rpc.WithPolicy(policy), rpc.WithGracePeriod(5 * time.Second)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	impl := &testEcho{release: make(chan struct{})}
	rpc.Register[echov1connect.EchoServiceHandler](srv, echov1connect.NewEchoServiceHandler, impl)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &env{ca: ca, dir: dir, url: "https://" + ln.Addr().String(), server: srv, impl: impl, cancel: cancel, done: make(chan error, 1)}
	go func() { e.done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		<-e.done
	})
	return e
}

func (e *env) client(t *testing.T, id string, opts ...connect.ClientOption) echov1connect.EchoServiceClient {
	t.Helper()
	hc := rpc.NewHTTPClient(identity(t, e.ca, e.dir, id), transport.AuthorizeID(spiffeid.RequireFromString(serverID)), e.copts...)
	return echov1connect.NewEchoServiceClient(hc, e.url, append(rpc.ClientOptions(), opts...)...)
}

var protocols = []struct {
	name string
	opt  []connect.ClientOption
}{
	{"connect", nil},
	{"grpc", []connect.ClientOption{connect.WithGRPC()}},
	{"grpcweb", []connect.ClientOption{connect.WithGRPCWeb()}},
}

func TestAllProtocolsAndStreamKinds(t *testing.T) {
	overTransports(t, testAllProtocolsAndStreamKinds)
}

func testAllProtocolsAndStreamKinds(t *testing.T, tr transportCase) {
	e := tr.start(t)
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			c := e.client(t, clientID, p.opt...)
			ctx := context.Background()
			res, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "hello"}))
			if err != nil || res.Msg.GetMessage() != "hello" {
				t.Fatalf("Echo = %v, %v", res, err)
			}
			who, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "whoami"}))
			if err != nil {
				t.Fatal(err)
			}
			if want := clientID + " X25519MLKEM768 pq=true"; who.Msg.GetMessage() != want {
				t.Fatalf("peer = %q, want %q", who.Msg.GetMessage(), want)
			}
			stream, err := c.EchoStream(ctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: "s", Count: 5}))
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for stream.Receive() {
				if stream.Msg().GetIndex() != uint32(n) || stream.Msg().GetMessage() != "s" {
					t.Fatalf("stream message %d = %v", n, stream.Msg())
				}
				n++
			}
			if err := stream.Err(); err != nil || n != 5 {
				t.Fatalf("stream: %d messages, %v", n, err)
			}
			if p.name == "grpcweb" {
				return // bidirectional streaming needs HTTP/2 full duplex, which gRPC-Web clients lack by design
			}
			bidi := c.EchoBidi(ctx)
			for i := range 3 {
				msg := fmt.Sprint("m", i)
				if err := bidi.Send(&echov1.EchoBidiRequest{Message: msg}); err != nil {
					t.Fatal(err)
				}
				got, err := bidi.Receive()
				if err != nil || got.GetMessage() != msg {
					t.Fatalf("bidi %d = %v, %v", i, got, err)
				}
			}
			if err := bidi.CloseRequest(); err != nil {
				t.Fatal(err)
			}
			if _, err := bidi.Receive(); !errors.Is(err, io.EOF) {
				t.Fatalf("bidi end = %v, want EOF", err)
			}
		})
	}
}

func TestPolicyDeniesByDefault(t *testing.T) {
	overTransports(t, testPolicyDeniesByDefault)
}

func testPolicyDeniesByDefault(t *testing.T, tr transportCase) {
	e := tr.start(t)
	c := e.client(t, "spiffe://example.org/intruder")
	_, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
	if connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("err = %v, want permission_denied", err)
	}
	for _, want := range []string{echoProc, "spiffe://example.org/intruder"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}
	// Streams are checked too.
	stream, err := c.EchoStream(context.Background(), connect.NewRequest(&echov1.EchoStreamRequest{Message: "s"}))
	if err == nil {
		for stream.Receive() {
			t.Fatal("denied stream delivered a message")
		}
		err = stream.Err()
	}
	if connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("stream err = %v", err)
	}
	if got := callsCounter(t, e, echoProc, "permission_denied"); got != 1 {
		t.Fatalf("permission_denied calls counted %v, want 1", got)
	}
}

func callsCounter(t *testing.T, e *env, procedure, code string) float64 {
	t.Helper()
	mfs, err := e.server.Registerer().(prometheus.Gatherer).Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "veil_rpc_calls_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["procedure"] == procedure && labels["code"] == code {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func metricValue(t *testing.T, e *env, name, label, value string) float64 {
	t.Helper()
	v, err := rpc.CounterValue(e.server.Registerer().(prometheus.Gatherer), name, label, value)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestInterceptors(t *testing.T) {
	e := start(t, rpc.WithReadLimit("/veil.echo.v1.EchoService/EchoStream", 64))
	c := e.client(t, clientID)
	ctx := context.Background()

	t.Run("validation", func(t *testing.T) {
		_, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: ""}))
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "message") {
			t.Fatalf("err = %v, want invalid_argument naming the field", err)
		}
		_, err = c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: strings.Repeat("x", 4097)}))
		if connect.CodeOf(err) != connect.CodeInvalidArgument {
			t.Fatalf("err = %v, want invalid_argument", err)
		}
	})
	t.Run("panic recovery", func(t *testing.T) {
		_, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "panic"}))
		if connect.CodeOf(err) != connect.CodeInternal || strings.Contains(err.Error(), "handler bug") {
			t.Fatalf("err = %v, want internal without the panic value", err)
		}
		if _, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "still serving"})); err != nil {
			t.Fatalf("server stopped serving after a panic: %v", err)
		}
	})
	t.Run("read limit", func(t *testing.T) {
		_, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: strings.Repeat("x", rpc.DefaultReadLimit+1)}))
		if connect.CodeOf(err) != connect.CodeResourceExhausted {
			t.Fatalf("err = %v, want resource_exhausted", err)
		}
		stream, err := c.EchoStream(ctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: strings.Repeat("y", 100)}))
		if err == nil {
			for stream.Receive() {
			}
			err = stream.Err()
		}
		if connect.CodeOf(err) != connect.CodeResourceExhausted {
			t.Fatalf("per-procedure limit: err = %v, want resource_exhausted", err)
		}
		// The lowered limit applies to EchoStream only.
		if _, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: strings.Repeat("z", 100)})); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		_, err := c.Echo(dctx, connect.NewRequest(&echov1.EchoRequest{Message: "block"}))
		if connect.CodeOf(err) != connect.CodeDeadlineExceeded {
			t.Fatalf("err = %v, want deadline_exceeded", err)
		}
	})
}

func TestNoCompressionByDefault(t *testing.T) {
	e := start(t)
	hc := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), transport.AuthorizeAny())
	body := []byte(`{"message":"` + strings.Repeat("compressible ", 200) + `"}`)
	req, _ := http.NewRequest(http.MethodPost, e.url+echoProc, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept-Encoding", "gzip")
	res, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(res.Body)
		t.Fatalf("status %d: %s", res.StatusCode, b)
	}
	if ce := res.Header.Get("Content-Encoding"); ce != "" {
		t.Fatalf("response compressed with %q", ce)
	}
}

func TestHealthAndReflectionForAnyVerifiedPeer(t *testing.T) {
	overTransports(t, testHealthAndReflectionForAnyVerifiedPeer)
}

func testHealthAndReflectionForAnyVerifiedPeer(t *testing.T, tr transportCase) {
	e := tr.start(t)
	// An identity outside the echo policy may still check health and reflect.
	hc := rpc.NewHTTPClient(identity(t, e.ca, e.dir, "spiffe://example.org/monitor"), transport.AuthorizeAny(), e.copts...)
	res, err := grpchealth.NewClient(hc, e.url).Check(context.Background(), &grpchealth.CheckRequest{Service: "veil.echo.v1.EchoService"})
	if err != nil || res.Status != grpchealth.StatusServing {
		t.Fatalf("health = %v, %v", res, err)
	}
	stream := grpcreflect.NewClient(hc, e.url).NewStream(context.Background())
	defer stream.Close()
	names, err := stream.ListServices()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, n := range names {
		found = found || n == "veil.echo.v1.EchoService"
	}
	if !found {
		t.Fatalf("reflection lists %v", names)
	}
}

func TestHandshakeRefusalsAreCounted(t *testing.T) {
	e := start(t)
	// No client certificate.
	noCert := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}, ForceAttemptHTTP2: true}}
	_, err := noCert.Post(e.url+echoProc, "application/json", strings.NewReader(`{"message":"x"}`))
	if err == nil {
		t.Fatal("call without a client certificate succeeded")
	}
	// Plain HTTP/1.1 without TLS.
	plain := &http.Client{}
	if res, err := plain.Post("http"+strings.TrimPrefix(e.url, "https")+echoProc, "application/json", strings.NewReader(`{"message":"x"}`)); err == nil {
		res.Body.Close()
		if res.StatusCode == http.StatusOK {
			t.Fatal("plaintext call succeeded")
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if metricValue(t, e, "veil_tls_handshake_failures_total", "reason", string(transport.ReasonNoClientCert)) == 1 &&
			metricValue(t, e, "veil_tls_handshake_failures_total", "reason", string(transport.ReasonNotTLS)) == 1 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("refusals counted: no_client_cert %v, not_tls %v",
		metricValue(t, e, "veil_tls_handshake_failures_total", "reason", string(transport.ReasonNoClientCert)),
		metricValue(t, e, "veil_tls_handshake_failures_total", "reason", string(transport.ReasonNotTLS)))
}

func TestGracefulShutdown(t *testing.T) {
	e := start(t)
	c := e.client(t, clientID)
	var wg sync.WaitGroup
	var inflight error
	var res *connect.Response[echov1.EchoResponse]
	wg.Add(1)
	go func() {
		defer wg.Done()
		res, inflight = c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "block"}))
	}()
	// Wait until the call is in the handler.
	deadline := time.Now().Add(5 * time.Second)
	for metricValue(t, e, "veil_tls_handshakes_total", "post_quantum", "true") == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	e.cancel()
	time.Sleep(100 * time.Millisecond)
	// New work is refused while the in-flight call finishes.
	fresh := e.client(t, clientID)
	if _, err := fresh.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "late"})); err == nil {
		t.Fatal("a new call was accepted after shutdown began")
	}
	close(e.impl.release)
	wg.Wait()
	if inflight != nil || res.Msg.GetMessage() != "released" {
		t.Fatalf("in-flight call = %v, %v", res, inflight)
	}
	if err := <-e.done; err != nil {
		t.Fatalf("Serve = %v", err)
	}
	e.done <- nil // for the cleanup
}

func TestMetricsListenerAndOpenTelemetry(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := ln.Addr().String()
	ln.Close()
	e := start(t, rpc.WithMetricsAddr(metricsAddr), rpc.WithOpenTelemetry())
	c := e.client(t, clientID)
	if _, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "counted"})); err != nil {
		t.Fatal(err)
	}
	var body []byte
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		res, err := http.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			continue
		}
		body, _ = io.ReadAll(res.Body)
		res.Body.Close()
		break
	}
	for _, want := range []string{
		`veil_rpc_calls_total{code="ok",procedure="/veil.echo.v1.EchoService/Echo",side="server"} 1`,
		`veil_tls_handshakes_total{group="X25519MLKEM768",post_quantum="true",resumed="false",side="server"}`,
		`veil_rpc_duration_seconds_bucket`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// flakyDep fails its checks while down is set.
type flakyDep struct{ down atomic.Bool }

func (d *flakyDep) Check(context.Context) error {
	if d.down.Load() {
		return errors.New("store unreachable")
	}
	return nil
}

// A failing dependency turns the services NOT_SERVING and back; it and the identity
// are independent reasons (one recovering does not hide the other).
func TestWatchDependencyHealth(t *testing.T) {
	e := start(t)
	dep := &flakyDep{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := e.server.WatchDependency(ctx, "state", dep, 20*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	hc := rpc.NewHTTPClient(identity(t, e.ca, e.dir, "spiffe://example.org/monitor"), transport.AuthorizeAny())
	health := grpchealth.NewClient(hc, e.url)
	waitHealth := func(want grpchealth.Status) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			res, err := health.Check(context.Background(), &grpchealth.CheckRequest{Service: "veil.echo.v1.EchoService"})
			if err == nil && res.Status == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("health = %v, %v; want %v", res, err, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitHealth(grpchealth.StatusServing)
	dep.down.Store(true)
	waitHealth(grpchealth.StatusNotServing)
	dep.down.Store(false)
	waitHealth(grpchealth.StatusServing)
}
