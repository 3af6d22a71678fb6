package rpc_test

import (
	"context"
	"testing"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// serverHandshakes counts the TLS handshakes the server completed.
func serverHandshakes(t *testing.T, e *env) float64 {
	t.Helper()
	mfs, err := e.server.Registerer().(prometheus.Gatherer).Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0.0
	for _, mf := range mfs {
		if mf.GetName() == "veil_tls_handshakes_total" {
			for _, m := range mf.GetMetric() {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return n
}

// CloseIdleConnections reaches the transport through the sealing round tripper, so
// the next call opens a new connection.
func TestCloseIdleConnectionsThroughSealing(t *testing.T) {
	e := startSealed(t)
	hc := sealedClient(t, e.ca, e.dir, clientID, transport.AuthorizeID(spiffeid.RequireFromString(serverID)), nil)
	c := echov1connect.NewEchoServiceClient(hc, e.url, rpc.ClientOptions()...)
	call := func() {
		t.Helper()
		if _, err := c.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "hi"})); err != nil {
			t.Fatal(err)
		}
	}
	call()
	before := serverHandshakes(t, e)
	hc.CloseIdleConnections()
	call()
	if after := serverHandshakes(t, e); after != before+1 {
		t.Fatalf("handshakes %v then %v: CloseIdleConnections did not close the sealed client's connection", before, after)
	}
}
