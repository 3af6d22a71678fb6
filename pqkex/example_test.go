package pqkex_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"time"

	"connectrpc.com/connect"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/pqkex/pqkextest"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// A server and a client turn pqkex on with one option each: the server wraps its connect-go
// handlers, the client wraps its HTTP/2 transport. The handler sees the authenticated peer.
func Example() {
	ca, err := pqkextest.NewCA()
	if err != nil {
		panic(err)
	}
	now := time.Now()
	serverIdentity, _ := ca.Identity(pqkex.X25519MLKEM768(), "spiffe://example.org/greeter", now.Add(-time.Minute), now.Add(time.Hour), nil)
	clientIdentity, _ := ca.Identity(pqkex.X25519MLKEM768(), "spiffe://example.org/frontend", now.Add(-time.Minute), now.Add(time.Hour), nil)

	// Server: connect-go handlers behind pqkex, over mTLS.
	const procedure = "/greet.v1.GreetService/Greet"
	mux := http.NewServeMux()
	mux.Handle(procedure, connect.NewUnaryHandler(procedure, func(ctx context.Context, req *connect.Request[wrapperspb.StringValue]) (*connect.Response[wrapperspb.StringValue], error) {
		peer, _ := pqkex.PeerFromContext(ctx)
		return connect.NewResponse(wrapperspb.String("hello " + req.Msg.Value + ", " + peer.SPIFFEID)), nil
	}))
	srv, err := pqkex.NewServer(pqkex.WithIdentity(serverIdentity), pqkex.WithRoots(ca.Roots()))
	if err != nil {
		panic(err)
	}
	ts := httptest.NewUnstartedServer(srv.Handler(mux))
	ts.EnableHTTP2 = true
	ts.TLS, _ = ca.ServerTLSConfig("spiffe://example.org/greeter")
	ts.StartTLS()
	defer ts.Close()

	// Client: pqkex around an HTTP/2 mTLS transport, expecting the greeter's identity.
	cli, err := pqkex.NewClient(
		pqkex.WithIdentity(clientIdentity),
		pqkex.WithRoots(ca.Roots()),
		pqkex.WithAuthorizer(pqkex.AuthorizeID("spiffe://example.org/greeter")),
	)
	if err != nil {
		panic(err)
	}
	tlsConfig, _ := ca.ClientTLSConfig("spiffe://example.org/frontend")
	transport := &http.Transport{TLSClientConfig: tlsConfig, ForceAttemptHTTP2: true}
	defer transport.CloseIdleConnections()
	httpClient := &http.Client{Transport: cli.RoundTripper(transport)}

	greeter := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](httpClient, ts.URL+procedure, connect.WithGRPC())
	resp, err := greeter.CallUnary(context.Background(), connect.NewRequest(wrapperspb.String("world")))
	if err != nil {
		panic(err)
	}
	fmt.Println(resp.Msg.Value)
	// Output: hello world, spiffe://example.org/frontend
}

// The CA certifies a workload's static hybrid KEM key with its ML-DSA-65 key and its
// classical key; the workload pairs the credential with its private key.
func ExampleIssueCredential() {
	ca, err := pqkextest.NewCA()
	if err != nil {
		panic(err)
	}
	suite := pqkex.X25519MLKEM768()
	pub, priv, err := pqkex.GenerateKey(suite, nil)
	if err != nil {
		panic(err)
	}
	notBefore := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cred, err := pqkex.IssueCredential(ca.PQ, ca.Classical, suite, "spiffe://example.org/db", notBefore, notBefore.Add(24*time.Hour), pub)
	if err != nil {
		panic(err)
	}
	id, err := pqkex.NewIdentity(cred, priv)
	if err != nil {
		panic(err)
	}
	c := id.Credential()
	fmt.Println(c.SPIFFEID(), c.Suite().Name(), c.NotAfter().Format(time.RFC3339))
	fmt.Println("verifies:", ca.Roots().Verify(c, notBefore.Add(time.Hour)) == nil)
	fmt.Println("expired later:", ca.Roots().Verify(c, notBefore.Add(48*time.Hour)) != nil)
	// Output:
	// spiffe://example.org/db X25519MLKEM768-SHA256 2026-01-02T00:00:00Z
	// verifies: true
	// expired later: true
}

// Replicas share ticket keys so any of them continues a session; rotation keeps the previous
// key until the next rotation.
func ExampleTicketKeys() {
	k1, _ := pqkex.GenerateTicketKey(1, nil)
	k2, _ := pqkex.GenerateTicketKey(2, nil)
	keys, err := pqkex.NewTicketKeys(k1)
	if err != nil {
		panic(err)
	}
	fmt.Println("current:", keys.CurrentID())
	if err := keys.Rotate(k2); err != nil {
		panic(err)
	}
	fmt.Println("current:", keys.CurrentID())
	// Output:
	// current: 1
	// current: 2
}

func ExampleSchemeByName() {
	for _, name := range []string{"X25519MLKEM768-SHA256", "X448MLKEM1024-SHA512", "SM2MLKEM768-SM3"} {
		s := pqkex.SchemeByName(name)
		fmt.Printf("%s id=%#04x pk=%d ct=%d ss=%d hash=%v\n", s.Name(), s.ID(), s.PublicKeySize(), s.CiphertextSize(), s.SharedKeySize(), s.Hash())
	}
	// Output:
	// X25519MLKEM768-SHA256 id=0x0001 pk=1216 ct=1120 ss=64 hash=SHA-256
	// X448MLKEM1024-SHA512 id=0x0002 pk=1624 ct=1624 ss=96 hash=SHA-512
	// SM2MLKEM768-SM3 id=0x0003 pk=1249 ct=1153 ss=64 hash=SM3
}

// RequireSuites turns on the ShangMi compliance mode: a ShangMi identity (its credential
// signed with the CA's SM2 key), sessions sealed with SM4-GCM, and nothing of another suite
// accepted. A server whose own identity is of another suite does not start.
func ExampleRequireSuites() {
	ca, err := pqkextest.NewCA() // with an SM2 key beside the ML-DSA-65 and ECDSA keys
	if err != nil {
		panic(err)
	}
	now := time.Now()
	sm, _ := ca.Identity(pqkex.SM2MLKEM768(), "spiffe://example.org/ledger", now.Add(-time.Minute), now.Add(time.Hour), nil)
	other, _ := ca.Identity(pqkex.X25519MLKEM768(), "spiffe://example.org/ledger", now.Add(-time.Minute), now.Add(time.Hour), nil)

	fmt.Println(sm.Credential().Suite().Name(), sm.Credential().Suite().Hash(), pqkex.SM4GCM)
	if _, err := pqkex.NewServer(pqkex.WithIdentity(sm), pqkex.WithRoots(ca.Roots()), pqkex.RequireSuites(pqkex.SM2MLKEM768())); err == nil {
		fmt.Println("ShangMi-only server: ok")
	}
	_, err = pqkex.NewServer(pqkex.WithIdentity(other), pqkex.WithRoots(ca.Roots()), pqkex.RequireSuites(pqkex.SM2MLKEM768()))
	fmt.Println(err)
	// Output:
	// SM2MLKEM768-SM3 SM3 SM4-GCM
	// ShangMi-only server: ok
	// pqkex: the server's identity is of a suite RequireSuites does not allow
}
