package rpc_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/echo"
	"github.com/veilrpc/veil/transport"
)

// A server with WithHTTP3 serves HTTP/2 on its TCP port and HTTP/3 on the UDP port of
// the same number; a client with WithHTTP3 calls it over QUIC, with the same mutual
// TLS 1.3 and post-quantum key exchange, and one without it over HTTP/2.
func ExampleWithHTTP3() {
	dir, err := os.MkdirTemp("", "veil-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		log.Fatal(err)
	}
	identity := func(id string) transport.Source {
		out := filepath.Join(dir, filepath.Base(id))
		if err := ca.IssueFiles(spiffeid.RequireFromString(id), out, time.Hour); err != nil {
			log.Fatal(err)
		}
		src, err := transport.LoadFiles(out)
		if err != nil {
			log.Fatal(err)
		}
		return src
	}
	policy := rpc.NewPolicy().MustAllow("/veil.echo.v1.EchoService/*", "spiffe://example.org/client")
	srv, err := rpc.NewServer(identity("spiffe://example.org/echo"), rpc.WithPolicy(policy), rpc.WithHTTP3(),
		rpc.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		log.Fatal(err)
	}
	rpc.Register(srv, echov1connect.NewEchoServiceHandler, echov1connect.EchoServiceHandler(echo.New()))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	defer func() { stop(); <-done }()

	server := transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/echo"))
	client := identity("spiffe://example.org/client")
	for _, opts := range [][]rpc.ClientOption{{rpc.WithHTTP3()}, nil} {
		var proto string
		opts = append(opts, rpc.WithRoundTripper(func(next http.RoundTripper) http.RoundTripper {
			return roundTripFunc(func(r *http.Request) (*http.Response, error) {
				res, err := next.RoundTrip(r)
				if err == nil {
					proto = fmt.Sprintf("%s %s", res.Proto, res.TLS.CurveID)
				}
				return res, err
			})
		}))
		hc := rpc.NewHTTPClient(client, server, opts...)
		c := echov1connect.NewEchoServiceClient(hc, "https://"+ln.Addr().String(), rpc.ClientOptions()...)
		res, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hello"}))
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(res.Msg.GetMessage(), "over", proto)
	}
	// Output:
	// hello over HTTP/3.0 X25519MLKEM768
	// hello over HTTP/2.0 X25519MLKEM768
}
