package rpc_test

import (
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/rpc"
)

// A policy allows the payments service to call Echo, and every workload of the
// example.org trust domain to call the whole health service; everything else is
// denied, a caller from another trust domain included.
func ExamplePolicy() {
	policy := rpc.NewPolicy().
		MustAllow("/veil.echo.v1.EchoService/Echo", "spiffe://example.org/payments").
		MustAllow("/grpc.health.v1.Health/*", "spiffe://example.org")
	for _, c := range []struct{ procedure, caller string }{
		{"/veil.echo.v1.EchoService/Echo", "spiffe://example.org/payments"},
		{"/veil.echo.v1.EchoService/Echo", "spiffe://example.org/ledger"},
		{"/grpc.health.v1.Health/Check", "spiffe://example.org/ledger"},
		{"/grpc.health.v1.Health/Check", "spiffe://other.org/payments"},
	} {
		err := policy.Authorize(c.procedure, spiffeid.RequireFromString(c.caller))
		fmt.Printf("%s -> %s: allowed %v\n", c.caller, c.procedure, err == nil)
	}
	// Output:
	// spiffe://example.org/payments -> /veil.echo.v1.EchoService/Echo: allowed true
	// spiffe://example.org/ledger -> /veil.echo.v1.EchoService/Echo: allowed false
	// spiffe://example.org/ledger -> /grpc.health.v1.Health/Check: allowed true
	// spiffe://other.org/payments -> /grpc.health.v1.Health/Check: allowed false
}
