package rpc_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// sealingDir issues an X.509 and a sealing identity for id and returns their directory.
func sealingDir(t *testing.T, ca *pki.CA, dir, id string) string {
	t.Helper()
	out := filepath.Join(dir, strings.NewReplacer("spiffe://", "", "/", "_").Replace(id))
	sid := spiffeid.RequireFromString(id)
	if err := ca.IssueFiles(sid, out, time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := rpc.IssueSealingIdentity(ca, sid, out, time.Hour, nil); err != nil {
		t.Fatal(err)
	}
	return out
}

func sealedServer(t *testing.T, ca *pki.CA, dir string) rpc.ServerOption {
	t.Helper()
	id, roots, err := rpc.LoadSealingIdentity(sealingDir(t, ca, dir, serverID))
	if err != nil {
		t.Fatal(err)
	}
	// Channel binding is not required: the proxy test reaches this server through a
	// TLS-terminating hop, where binding to the TLS connection cannot hold.
	s, err := pqkex.NewServer(pqkex.WithIdentity(id), pqkex.WithRoots(roots))
	if err != nil {
		t.Fatal(err)
	}
	return rpc.WithSealing(s)
}

func sealedClient(t *testing.T, ca *pki.CA, dir, id string, hop transport.Authorizer, ropts []rpc.ClientOption, opts ...pqkex.Option) *http.Client {
	t.Helper()
	d := sealingDir(t, ca, dir, id)
	pid, roots, err := rpc.LoadSealingIdentity(d)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := pqkex.NewClient(append([]pqkex.Option{pqkex.WithIdentity(pid), pqkex.WithRoots(roots), pqkex.WithAuthorizer(pqkex.AuthorizeID(serverID))}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	src, err := transport.LoadFiles(d)
	if err != nil {
		t.Fatal(err)
	}
	return rpc.NewHTTPClient(src, hop, append([]rpc.ClientOption{rpc.WithClientSealing(pc)}, ropts...)...)
}

// startSealed starts an echo server whose calls must be sealed.
func startSealed(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	return startWith(t, dir, ca, sealedServer(t, ca, dir))
}

func TestSealedCallsAllProtocols(t *testing.T) {
	overTransports(t, testSealedCallsAllProtocols)
}

func testSealedCallsAllProtocols(t *testing.T, tr transportCase) {
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	e := tr.startWith(t, dir, ca, sealedServer(t, ca, dir))
	hc := sealedClient(t, e.ca, e.dir, clientID, transport.AuthorizeID(spiffeid.RequireFromString(serverID)), e.copts, pqkex.WithChannelBinding())
	sealedCallsAllProtocols(t, e, hc, clientID+" X25519MLKEM768 pq=true sealed=true bound=true")
}

// sealedCallsAllProtocols runs unary, server-stream and bidi calls over every protocol and
// checks the peer the handler sees (whoami) against want.
func sealedCallsAllProtocols(t *testing.T, e *env, hc *http.Client, want string) {
	t.Helper()
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			c := echov1connect.NewEchoServiceClient(hc, e.url, append(rpc.ClientOptions(), p.opt...)...)
			ctx := context.Background()
			who, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "whoami"}))
			if err != nil {
				t.Fatal(err)
			}
			if who.Msg.GetMessage() != want {
				t.Fatalf("peer = %q, want %q", who.Msg.GetMessage(), want)
			}
			stream, err := c.EchoStream(ctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: "s", Count: 50}))
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for stream.Receive() {
				n++
			}
			if stream.Err() != nil || n != 50 {
				t.Fatalf("stream: %d, %v", n, stream.Err())
			}
			if p.name == "grpcweb" {
				return
			}
			bidi := c.EchoBidi(ctx)
			for i := range 3 {
				if err := bidi.Send(&echov1.EchoBidiRequest{Message: fmt.Sprint(i)}); err != nil {
					t.Fatal(err)
				}
				if m, err := bidi.Receive(); err != nil || m.GetMessage() != fmt.Sprint(i) {
					t.Fatalf("bidi %d: %v %v", i, m, err)
				}
			}
			_ = bidi.CloseRequest()
			if _, err := bidi.Receive(); !errors.Is(err, io.EOF) {
				t.Fatalf("bidi end: %v", err)
			}
		})
	}
}

func TestStrictSealingRefusesPlaintextCalls(t *testing.T) {
	e := startSealed(t)
	c := e.client(t, clientID)
	_, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "in the clear"}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("err = %v, want unauthenticated", err)
	}
}

// recordingProxy terminates TLS as spiffe://example.org/proxy, records every body it
// forwards and passes calls on to the server over its own mTLS connection.
type recordingProxy struct {
	mu   sync.Mutex
	seen bytes.Buffer
}

func (p *recordingProxy) record(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seen.Write(b)
}

type teeBody struct {
	io.ReadCloser
	p *recordingProxy
}

func (t teeBody) Read(b []byte) (int, error) {
	n, err := t.ReadCloser.Read(b)
	t.p.record(b[:n])
	return n, err
}

func TestSealedThroughTerminatingProxy(t *testing.T) {
	e := startSealed(t)
	proxyID := "spiffe://example.org/proxy"
	// The proxy's hop to the server: mTLS as the proxy.
	proxySrc := identity(t, e.ca, e.dir, proxyID)
	upstream, _ := url.Parse(e.url)
	rec := &recordingProxy{}
	rp := httputil.NewSingleHostReverseProxy(upstream)
	rp.Transport = rpc.NewHTTPClient(proxySrc, transport.AuthorizeID(spiffeid.RequireFromString(serverID))).Transport
	rp.ModifyResponse = func(r *http.Response) error {
		r.Body = teeBody{r.Body, rec}
		return nil
	}
	rp.FlushInterval = -1
	front := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = teeBody{r.Body, rec}
		rp.ServeHTTP(w, r)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: front, TLSConfig: transport.ServerConfig(proxySrc)}
	go func() { _ = hs.ServeTLS(ln, "", "") }()
	t.Cleanup(func() { hs.Close() })

	// The client's TLS peer is the proxy; its sealed peer is the server. By default the
	// sealed calls expect the TLS hop's server (the proxy) end to end, so they are refused.
	proxyURL := "https://" + ln.Addr().String()
	hopOnly := sealedClient(t, e.ca, e.dir, clientID, transport.AuthorizeID(spiffeid.RequireFromString(proxyID)), nil, pqkex.WithoutChannelBinding(proxyURL))
	_, err = echov1connect.NewEchoServiceClient(hopOnly, proxyURL, rpc.ClientOptions()...).Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "x"}))
	if connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("sealed call expecting the proxy end to end: %v, want permission_denied", err)
	}
	hc := sealedClient(t, e.ca, e.dir, clientID, transport.AuthorizeID(spiffeid.RequireFromString(proxyID)),
		[]rpc.ClientOption{rpc.WithSealedServer(pqkex.AuthorizeID(serverID))}, pqkex.WithoutChannelBinding(proxyURL))
	c := echov1connect.NewEchoServiceClient(hc, proxyURL, rpc.ClientOptions()...)
	secret := "feature-vector-0.7311-top-secret"
	res, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: secret}))
	if err != nil || res.Msg.GetMessage() != secret {
		t.Fatalf("Echo via proxy = %v, %v", res, err)
	}
	// The server authorized the end-to-end identity, not the proxy's.
	who, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "whoami"}))
	if err != nil || !strings.HasPrefix(who.Msg.GetMessage(), clientID+" ") || !strings.HasSuffix(who.Msg.GetMessage(), "sealed=true bound=false") {
		t.Fatalf("whoami via proxy = %v, %v", who, err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.seen.Len() == 0 {
		t.Fatal("the proxy saw no bodies")
	}
	if bytes.Contains(rec.seen.Bytes(), []byte(secret)) || bytes.Contains(rec.seen.Bytes(), []byte("top-secret")) {
		t.Fatal("the proxy saw plaintext")
	}
}
