package average_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/examples/average"
	"github.com/veilrpc/veil/gen/veil/example/v1/examplev1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// Example runs the whole guide: a CA, a server that averages encrypted vectors over
// strict mTLS, and a client that encrypts, calls and decrypts.
func Example() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, _ := os.MkdirTemp("", "veil-example-")
	defer os.RemoveAll(dir)

	// 1. Identities: a throw-away CA issues the server's and the client's.
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		panic(err)
	}
	serverID := spiffeid.RequireFromString("spiffe://example.org/average")
	clientID := spiffeid.RequireFromString("spiffe://example.org/ns/lab/sa/alice")
	for id, sub := range map[spiffeid.ID]string{serverID: "server", clientID: "client"} {
		if err := ca.IssueFiles(id, filepath.Join(dir, sub), time.Hour); err != nil {
			panic(err)
		}
	}
	serverSrc, _ := transport.LoadFiles(filepath.Join(dir, "server"))
	clientSrc, _ := transport.LoadFiles(filepath.Join(dir, "client"))

	// 2. The server: policy, read limit for ciphertexts, the generated handler.
	params := he.ParamsN13()
	svc, err := average.New(params)
	if err != nil {
		panic(err)
	}
	policy := rpc.NewPolicy().MustAllow("/veil.example.v1.AverageService/*", "spiffe://example.org/ns/*/sa/*")
	srv, err := rpc.NewServer(serverSrc, rpc.WithPolicy(policy), rpc.WithPQMode(transport.PQStrict),
		rpc.WithReadLimit(examplev1connect.AverageServiceAverageProcedure, average.ReadLimit(params)))
	if err != nil {
		panic(err)
	}
	rpc.Register[examplev1connect.AverageServiceHandler](srv, examplev1connect.NewAverageServiceHandler, svc)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()

	// 3. The client: only it holds the secret key.
	key, err := he.NewClient(params)
	if err != nil {
		panic(err)
	}
	hc := rpc.NewHTTPClient(clientSrc, transport.AuthorizeID(serverID))
	client := examplev1connect.NewAverageServiceClient(hc, "https://"+ln.Addr().String(), rpc.ClientOptions()...)
	mean, who, err := average.Average(ctx, client, key, []float64{1, 2, 3}, []float64{3, 4, 5})
	if err != nil {
		panic(err)
	}
	fmt.Printf("computed for %s: %.3f %.3f %.3f\n", who, mean[0], mean[1], mean[2])
	cancel()
	<-done
	// Output: computed for spiffe://example.org/ns/lab/sa/alice: 2.000 3.000 4.000
}
