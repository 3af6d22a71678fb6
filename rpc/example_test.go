package rpc_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"net"
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

// A server and a client with identities from one CA: the server's policy lets the
// client's SPIFFE ID call the echo service, the call runs over mutual TLS 1.3 with
// post-quantum hybrid key exchange, and a caller outside the policy is refused.
func Example() {
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
	srv, err := rpc.NewServer(identity("spiffe://example.org/echo"), rpc.WithPolicy(policy),
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

	url := "https://" + ln.Addr().String()
	server := transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/echo"))
	for _, caller := range []string{"spiffe://example.org/client", "spiffe://example.org/intruder"} {
		hc := rpc.NewHTTPClient(identity(caller), server)
		client := echov1connect.NewEchoServiceClient(hc, url, rpc.ClientOptions()...)
		res, err := client.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hello"}))
		if err != nil {
			fmt.Println(filepath.Base(caller)+":", connect.CodeOf(err))
			continue
		}
		fmt.Println(filepath.Base(caller)+":", res.Msg.GetMessage())
	}
	// Output:
	// client: hello
	// intruder: permission_denied
}
