package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// fakeWorkloadAPI is a SPIFFE Workload API that streams the X.509-SVIDs it is given,
// as a SPIRE agent does when it rotates them. (integration/TestSPIRE runs a real one.)
type fakeWorkloadAPI struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	svids chan *workload.X509SVIDResponse
}

func (f *fakeWorkloadAPI) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case r := <-f.svids:
			if err := stream.Send(r); err != nil {
				return err
			}
		}
	}
}

func svidResponse(t *testing.T, ca *pki.CA, id spiffeid.ID) (*workload.X509SVIDResponse, string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	chain, err := ca.Issue(id, &key.PublicKey, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	var certs, roots []byte
	for _, c := range chain {
		certs = append(certs, c.Raw...)
	}
	for _, r := range ca.Bundle() {
		roots = append(roots, r.Raw...)
	}
	return &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{SpiffeId: id.String(), X509Svid: certs, X509SvidKey: keyDER, Bundle: roots}}},
		chain[0].SerialNumber.Text(16)
}

// TestServeFromWorkloadAPI runs `veil serve --spiffe-socket` against a Workload API
// that rotates the SVID: new handshakes present the new certificate at once.
func TestServeFromWorkloadAPI(t *testing.T) {
	tmp := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(tmp, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.IssueFiles(spiffeid.RequireFromString("spiffe://example.org/client"), filepath.Join(tmp, "client"), time.Hour); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(tmp, "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	api := &fakeWorkloadAPI{svids: make(chan *workload.X509SVIDResponse, 1)}
	gs := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(gs, api)
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)

	echoID := spiffeid.RequireFromString("spiffe://example.org/echo")
	first, firstSerial := svidResponse(t, ca, echoID)
	api.svids <- first
	port := startServe(t, "--spiffe-socket", sock, "--service", "echo", "--allow", "spiffe://example.org/client")
	addr := "127.0.0.1:" + port
	client, err := transport.LoadFiles(filepath.Join(tmp, "client"))
	if err != nil {
		t.Fatal(err)
	}
	if got := serverSerial(t, addr, client); got != firstSerial {
		t.Fatalf("serving %s, want the Workload API's %s", got, firstSerial)
	}
	second, secondSerial := svidResponse(t, ca, echoID)
	api.svids <- second
	deadline := time.Now().Add(10 * time.Second)
	for serverSerial(t, addr, client) != secondSerial {
		if time.Now().After(deadline) {
			t.Fatal("the rotated SVID was not picked up")
		}
		time.Sleep(20 * time.Millisecond)
	}
	hc := rpc.NewHTTPClient(client, transport.AuthorizeID(echoID))
	if _, err := echov1connect.NewEchoServiceClient(hc, "https://"+addr, rpc.ClientOptions()...).
		Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "spiffe"})); err != nil {
		t.Fatal(err)
	}
}
