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

// TestOptionsServeBothSides: one Option value configures a server and a client alike.
// With one registry given to both, the server's and the client's handshakes are both
// counted there.
func TestOptionsServeBothSides(t *testing.T) {
	reg := prometheus.NewRegistry()
	shared := []rpc.Option{rpc.WithMetrics(reg), rpc.WithPQMode(transport.PQStrict), rpc.WithWriteCoalescing(false)}
	var srvOpts []rpc.ServerOption
	var cliOpts []rpc.ClientOption
	for _, o := range shared {
		srvOpts, cliOpts = append(srvOpts, o), append(cliOpts, o)
	}
	e := start(t, srvOpts...)
	hc := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), transport.AuthorizeID(spiffeid.RequireFromString(serverID)), cliOpts...)
	client := echov1connect.NewEchoServiceClient(hc, e.url, rpc.ClientOptions()...)
	if _, err := client.Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "x"})); err != nil {
		t.Fatal(err)
	}
	if e.server.Registerer() != prometheus.Registerer(reg) {
		t.Fatal("the server does not report the registerer it was given")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sides := map[string]bool{}
	for _, mf := range mfs {
		if mf.GetName() != "veil_tls_handshakes_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "side" {
					sides[l.GetValue()] = true
				}
			}
		}
	}
	if !sides["server"] || !sides["client"] {
		t.Fatalf("handshakes counted for sides %v, want server and client", sides)
	}
}

// TestMetricsAddrNeedsGatherer: a metrics listener cannot serve a registerer it cannot
// read; NewServer says so instead of serving an empty page.
func TestMetricsAddrNeedsGatherer(t *testing.T) {
	wrapped := prometheus.WrapRegistererWithPrefix("app_", prometheus.NewRegistry())
	if _, err := rpc.NewServer(transport.StaticSource{}, rpc.WithMetrics(wrapped), rpc.WithMetricsAddr("127.0.0.1:0")); err == nil {
		t.Fatal("WithMetricsAddr accepted a registerer that is not a Gatherer")
	}
}
