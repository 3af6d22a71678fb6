// Package rpc builds Veil servers and clients: Connect, gRPC and gRPC-Web over HTTP/2
// with strict mutual TLS 1.3 and SPIFFE identities (package transport), per-procedure
// authorization that denies by default, protovalidate, panic recovery, read limits,
// metrics, health and reflection.
//
// A server:
//
//	srv, err := rpc.NewServer(source, rpc.WithPolicy(policy))
//	rpc.Register(srv, echov1connect.NewEchoServiceHandler, echo.New())
//	err = srv.ListenAndServe(ctx, "127.0.0.1:8443")
//
// A client:
//
//	httpClient := rpc.NewHTTPClient(source, transport.AuthorizeID(serverID))
//	client := echov1connect.NewEchoServiceClient(httpClient, "https://127.0.0.1:8443", rpc.ClientOptions()...)
//
// Handlers read the verified caller with PeerFromContext.
//
// WithHTTP3 adds HTTP/3 (QUIC, github.com/quic-go/quic-go) on the UDP port with the TCP
// port's number, with the same TLS configuration, handlers and sealing; a client with
// WithHTTP3 dials it, one with WithHTTP3Auto falls back to HTTP/2 where UDP is blocked.
package rpc
