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

// Every other test runs with write coalescing on (the default); this one turns it off
// on both sides, and on one side only, and calls each stream kind.
func TestWriteCoalescingOff(t *testing.T) {
	for _, c := range []struct {
		name           string
		server, client bool
	}{{"both off", false, false}, {"server only", true, false}, {"client only", false, true}} {
		t.Run(c.name, func(t *testing.T) {
			e := start(t, rpc.WithWriteCoalescing(c.server))
			hc := rpc.NewHTTPClient(identity(t, e.ca, e.dir, clientID), transport.AuthorizeID(spiffeid.RequireFromString(serverID)),
				rpc.WithWriteCoalescing(c.client))
			client := echov1connect.NewEchoServiceClient(hc, e.url, rpc.ClientOptions()...)
			ctx := context.Background()
			res, err := client.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "hello"}))
			if err != nil || res.Msg.GetMessage() != "hello" {
				t.Fatalf("Echo = %v, %v", res, err)
			}
			stream, err := client.EchoStream(ctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: "s", Count: 20}))
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for stream.Receive() {
				n++
			}
			if stream.Err() != nil || n != 20 {
				t.Fatalf("stream: %d messages, %v", n, stream.Err())
			}
			bidi := client.EchoBidi(ctx)
			if err := bidi.Send(&echov1.EchoBidiRequest{Message: "b"}); err != nil {
				t.Fatal(err)
			}
			if got, err := bidi.Receive(); err != nil || got.GetMessage() != "b" {
				t.Fatalf("bidi = %v, %v", got, err)
			}
			_ = bidi.CloseRequest()
		})
	}
}
