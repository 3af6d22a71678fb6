package rpc_test

import (
	"context"
	"testing"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// TestHTTP3ReturningClientSkipsRetry: the Retry budget is global (the address of an
// Initial is unvalidated, so it cannot be per client), so one flooder makes every new
// client pay a Retry. A client that has connected before keeps the address-validation
// token the server sent it (NEW_TOKEN, RFC 9000 8.1.3) and presents it when it
// reconnects: the server then has a validated address and sends no Retry, however
// spent the budget is. Before the fix the client kept no token and paid a Retry on
// every reconnect during a flood.
func TestHTTP3ReturningClientSkipsRetry(t *testing.T) {
	e := transports[1].start(t, rpc.WithHTTP3AddressValidation(0, 1)) // rate 0: one handshake without Retry, then every new one gets one
	serverAuth := transport.AuthorizeID(spiffeid.RequireFromString(serverID))
	a := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), serverAuth, rpc.WithHTTP3())
	defer a.CloseIdleConnections()
	echo := func(c echov1connect.EchoServiceClient, what string) {
		t.Helper()
		res, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: what}))
		if err != nil || res.Msg.GetMessage() != what {
			t.Fatalf("%s: %v, %v", what, res, err)
		}
	}
	ca := echov1connect.NewEchoServiceClient(a, e.url, rpc.ClientOptions()...)
	echo(ca, "first connection")
	if got := metricValue(t, e, "veil_quic_retries_total", "side", "server"); got != 0 {
		t.Fatalf("first connection got %v Retries within the budget", got)
	}
	// A new client now pays a Retry: the budget is spent.
	b := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), serverAuth, rpc.WithHTTP3())
	defer b.CloseIdleConnections()
	echo(echov1connect.NewEchoServiceClient(b, e.url, rpc.ClientOptions()...), "new client")
	spent := metricValue(t, e, "veil_quic_retries_total", "side", "server")
	if spent == 0 {
		t.Fatal("a new client past the budget got no Retry")
	}
	// The first client reconnects (a new QUIC connection) with its token: no Retry.
	a.CloseIdleConnections()
	echo(ca, "reconnect")
	if got := metricValue(t, e, "veil_quic_retries_total", "side", "server"); got != spent {
		t.Fatalf("a returning client was sent %v Retries", got-spent)
	}
}
