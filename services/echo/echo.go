// Package echo is the smallest Veil service: it returns what it is sent, over unary,
// server-streaming and bidirectional-streaming calls. It is the service `veil serve
// --service echo` runs and the one the demo and tests call.
package echo

import (
	"context"
	"errors"
	"io"

	"connectrpc.com/connect"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
)

// Service implements echov1connect.EchoServiceHandler.
type Service struct{}

var _ echov1connect.EchoServiceHandler = Service{}

// New returns the echo service.
func New() Service { return Service{} }

// Echo returns the request's message.
func (Service) Echo(_ context.Context, req *connect.Request[echov1.EchoRequest]) (*connect.Response[echov1.EchoResponse], error) {
	return connect.NewResponse(&echov1.EchoResponse{Message: req.Msg.GetMessage()}), nil
}

// EchoStream sends the message count times (at least once).
func (Service) EchoStream(ctx context.Context, req *connect.Request[echov1.EchoStreamRequest], stream *connect.ServerStream[echov1.EchoStreamResponse]) error {
	n := max(req.Msg.GetCount(), 1)
	for i := range n {
		if err := ctx.Err(); err != nil {
			return connect.NewError(connect.CodeCanceled, err)
		}
		if err := stream.Send(&echov1.EchoStreamResponse{Message: req.Msg.GetMessage(), Index: i}); err != nil {
			return err
		}
	}
	return nil
}

// EchoBidi echoes each message as it arrives until the client closes its side.
func (Service) EchoBidi(_ context.Context, stream *connect.BidiStream[echov1.EchoBidiRequest, echov1.EchoBidiResponse]) error {
	for {
		msg, err := stream.Receive()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&echov1.EchoBidiResponse{Message: msg.GetMessage()}); err != nil {
			return err
		}
	}
}
