package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/wrapperspb"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/echo"
	"github.com/veilrpc/veil/transport"
)

const (
	serverID = "spiffe://bench.veil/echo"
	clientID = "spiffe://bench.veil/ns/bench/sa/client"

	streamService   = "veil.bench.v1.StreamService"
	downloadProc    = "/" + streamService + "/Download"
	streamChunkSize = 64 << 10
)

// env is a CA with a server and a client identity (X.509 and sealing) in a temp dir.
type env struct {
	dir                  string
	ca                   *pki.CA
	serverSrc, clientSrc transport.Source
	serverDir, clientDir string

	clientSeal *pqkex.Identity // loaded on first use
	roots      pqkex.Roots
}

func newEnv() (*env, error) {
	dir, err := os.MkdirTemp("", "veil-bench-")
	if err != nil {
		return nil, err
	}
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "bench.veil")
	if err != nil {
		return nil, err
	}
	e := &env{dir: dir, ca: ca}
	issue := func(id string) (string, transport.Source, error) {
		out := filepath.Join(dir, strings.NewReplacer("spiffe://", "", "/", "_").Replace(id))
		sid := spiffeid.RequireFromString(id)
		if err := ca.IssueFiles(sid, out, 24*time.Hour); err != nil {
			return "", nil, err
		}
		if err := rpc.IssueSealingIdentity(ca, sid, out, 24*time.Hour, nil); err != nil {
			return "", nil, err
		}
		src, err := transport.LoadFiles(out)
		return out, src, err
	}
	if e.serverDir, e.serverSrc, err = issue(serverID); err != nil {
		return nil, err
	}
	if e.clientDir, e.clientSrc, err = issue(clientID); err != nil {
		return nil, err
	}
	return e, nil
}

func (e *env) close() { _ = os.RemoveAll(e.dir) }

// selected keeps the systems --only names (all without it) and stops the others.
func selected[T any](c *config, systems []T, describe func(T) (name string, stop func())) []T {
	return slices.DeleteFunc(systems, func(s T) bool {
		name, stop := describe(s)
		if c.onlyList == "" || slices.Contains(strings.Split(c.onlyList, ","), name) {
			return false
		}
		stop()
		return true
	})
}

// serverTLS and clientTLS are the mutual TLS 1.3 configurations every system uses:
// Veil's own, with the post-quantum hybrid key exchange required.
func (e *env) serverTLS() *tls.Config {
	return transport.ServerConfig(e.serverSrc, transport.WithPQMode(transport.PQStrict))
}

func (e *env) clientTLS() *tls.Config {
	return transport.ClientConfig(e.clientSrc, transport.WithPQMode(transport.PQStrict),
		transport.WithAuthorizer(transport.AuthorizeID(spiffeid.RequireFromString(serverID))))
}

// running is a started server; stop shuts it down.
type running struct {
	url  string
	addr string
	stop func()
}

// listenHost is where servers listen: loopback, or the bench's network namespace side
// of a veth pair in the h3 suite's server process.
var listenHost = "127.0.0.1"

func listen() (net.Listener, error) { return net.Listen("tcp", net.JoinHostPort(listenHost, "0")) }

// downloadHandler serves the stream suite's procedure: a server stream of count
// messages of streamChunkSize bytes each.
func downloadHandler(opts ...connect.HandlerOption) (string, http.Handler) {
	payload := make([]byte, streamChunkSize)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	h := connect.NewServerStreamHandler(downloadProc, func(ctx context.Context, req *connect.Request[wrapperspb.UInt32Value], stream *connect.ServerStream[wrapperspb.BytesValue]) error {
		msg := &wrapperspb.BytesValue{Value: payload}
		for range req.Msg.GetValue() {
			if err := stream.Send(msg); err != nil {
				return err
			}
		}
		return nil
	}, opts...)
	mux := http.NewServeMux()
	mux.Handle(downloadProc, h)
	return "/" + streamService + "/", mux
}

// startConnect serves echo and the stream procedure with plain connect-go over the
// same mutual TLS, gzip off.
func (e *env) startConnect() (*running, error) {
	ln, err := listen()
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle(echov1connect.NewEchoServiceHandler(echo.New(), connect.WithCompression("gzip", nil, nil)))
	mux.Handle(downloadHandler(connect.WithCompression("gzip", nil, nil)))
	hs := &http.Server{Handler: mux, TLSConfig: e.serverTLS(), ErrorLog: discardLog()}
	go func() { _ = hs.ServeTLS(ln, "", "") }()
	return &running{url: "https://" + ln.Addr().String(), addr: ln.Addr().String(), stop: func() { _ = hs.Close() }}, nil
}

// connectClient is an HTTP/2 client over the same mutual TLS, configured as Veil's.
func (e *env) connectClient() *http.Client {
	t := &http.Transport{TLSClientConfig: e.clientTLS(), ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 64}
	t.Protocols = new(http.Protocols)
	t.Protocols.SetHTTP2(true)
	return &http.Client{Transport: t}
}

// veilOptions selects what a Veil server or client turns on.
type veilOptions struct {
	sealed   bool
	coalesce bool
	// wrapListener, when set, wraps the server's listener (the handshake suite counts
	// bytes with it).
	wrapListener func(net.Listener) net.Listener
}

func (e *env) startVeil(o veilOptions) (*running, error) { return e.startVeilWith(o, nil) }

// startVeilWith also mounts extra (when not nil) with extra server options.
func (e *env) startVeilWith(o veilOptions, extra func(...connect.HandlerOption) (string, http.Handler), more ...rpc.ServerOption) (*running, error) {
	policy := rpc.NewPolicy().
		MustAllow("/veil.echo.v1.EchoService/*", "spiffe://bench.veil/ns/*/sa/*").
		MustAllow("/"+streamService+"/*", "spiffe://bench.veil/ns/*/sa/*").
		MustAllow("/"+scoreService+"/*", "spiffe://bench.veil/ns/*/sa/*").
		MustAllow("/veil.he.v1.KeyService/*", "spiffe://bench.veil/ns/*/sa/*")
	opts := []rpc.ServerOption{
		rpc.WithPolicy(policy), rpc.WithPQMode(transport.PQStrict), rpc.WithLogger(slog.New(slog.DiscardHandler)),
		rpc.WithGracePeriod(time.Second), rpc.WithWriteCoalescing(o.coalesce),
	}
	if o.sealed {
		id, roots, err := rpc.LoadSealingIdentity(e.serverDir)
		if err != nil {
			return nil, err
		}
		ps, err := pqkex.NewServer(pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.WithChannelBinding())
		if err != nil {
			return nil, err
		}
		opts = append(opts, rpc.WithSealing(ps))
	}
	srv, err := rpc.NewServer(e.serverSrc, append(opts, more...)...)
	if err != nil {
		return nil, err
	}
	rpc.Register(srv, echov1connect.NewEchoServiceHandler, echov1connect.EchoServiceHandler(echo.New()))
	srv.Handle(downloadHandler)
	if extra != nil {
		srv.Handle(extra)
	}
	ln, err := listen()
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().String()
	if o.wrapListener != nil {
		ln = o.wrapListener(ln)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx, ln) }()
	return &running{url: "https://" + addr, addr: addr, stop: func() { cancel(); <-done }}, nil
}

func (e *env) veilClient(o veilOptions, more ...rpc.ClientOption) (*http.Client, error) {
	opts := append([]rpc.ClientOption{rpc.WithPQMode(transport.PQStrict), rpc.WithWriteCoalescing(o.coalesce)}, more...)
	if o.sealed {
		if e.clientSeal == nil {
			id, roots, err := rpc.LoadSealingIdentity(e.clientDir)
			if err != nil {
				return nil, err
			}
			e.clientSeal, e.roots = id, roots
		}
		pc, err := pqkex.NewClient(pqkex.WithIdentity(e.clientSeal), pqkex.WithRoots(e.roots),
			pqkex.WithAuthorizer(pqkex.AuthorizeID(serverID)), pqkex.WithChannelBinding())
		if err != nil {
			return nil, err
		}
		opts = append(opts, rpc.WithClientSealing(pc))
	}
	return rpc.NewHTTPClient(e.clientSrc, transport.AuthorizeID(spiffeid.RequireFromString(serverID)), opts...), nil
}

// grpc-go: the echo service and the stream procedure registered by hand over the same
// generated messages (grpc's default codec marshals them with protobuf).
var grpcEchoDesc = grpc.ServiceDesc{
	ServiceName: "veil.echo.v1.EchoService",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Echo",
		Handler: func(_ any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			in := new(echov1.EchoRequest)
			if err := dec(in); err != nil {
				return nil, err
			}
			return &echov1.EchoResponse{Message: in.GetMessage()}, nil
		},
	}},
}

var grpcDownloadStream = grpc.StreamDesc{StreamName: "Download", ServerStreams: true}

func grpcStreamDesc() *grpc.ServiceDesc {
	payload := make([]byte, streamChunkSize)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	d := grpcDownloadStream
	d.Handler = func(_ any, stream grpc.ServerStream) error {
		req := new(wrapperspb.UInt32Value)
		if err := stream.RecvMsg(req); err != nil {
			return err
		}
		msg := &wrapperspb.BytesValue{Value: payload}
		for range req.GetValue() {
			if err := stream.SendMsg(msg); err != nil {
				return err
			}
		}
		return nil
	}
	return &grpc.ServiceDesc{ServiceName: streamService, HandlerType: (*any)(nil), Streams: []grpc.StreamDesc{d}}
}

func (e *env) startGRPC() (*running, error) {
	ln, err := listen()
	if err != nil {
		return nil, err
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(e.serverTLS())))
	gs.RegisterService(&grpcEchoDesc, struct{}{})
	gs.RegisterService(grpcStreamDesc(), struct{}{})
	go func() { _ = gs.Serve(ln) }()
	return &running{url: ln.Addr().String(), addr: ln.Addr().String(), stop: gs.Stop}, nil
}

func (e *env) grpcClient(addr string) (*grpc.ClientConn, error) {
	return grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(e.clientTLS())))
}

func discardLog() *log.Logger { return log.New(io.Discard, "", 0) }

// check returns an error if an echo call came back wrong.
func check(got, want string) error {
	if got != want {
		return fmt.Errorf("bench: echo returned %d bytes, want %d", len(got), len(want))
	}
	return nil
}
