package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/echo"
	"github.com/veilrpc/veil/transport"
)

type demoCall struct {
	Protocol string  `json:"protocol"`
	Kind     string  `json:"kind"`
	OK       bool    `json:"ok"`
	Millis   float64 `json:"ms"`
	Error    string  `json:"error,omitempty"`
}

type demoRefusal struct {
	Case   string `json:"case"`
	Result string `json:"result"`
}

type demoReport struct {
	TLSVersion   string        `json:"tls_version"`
	TLSGroup     string        `json:"tls_group"`
	PQSuite      string        `json:"pq_suite"`
	PQSeal       string        `json:"pq_seal"`
	PQMode       string        `json:"pq_mode"`
	TrustDomain  string        `json:"trust_domain"`
	ServerID     string        `json:"server_id"`
	ClientID     string        `json:"client_id"`
	SetupMillis  float64       `json:"setup_ms"`
	Handshake    float64       `json:"handshake_ms"`
	Calls        []demoCall    `json:"calls"`
	Refused      []demoRefusal `json:"refused"`
	TotalSeconds float64       `json:"total_seconds"`
}

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("demo", "demo [--json] [--keep DIR]", stderr)
	asJSON := fs.Bool("json", false, "print the report as one JSON object")
	keep := fs.String("keep", "", "write the CA and identities here instead of a temporary directory")
	if err := parse(fs, args); err != nil {
		return err
	}
	start := time.Now()
	dir := *keep
	if dir == "" {
		tmp, err := os.MkdirTemp("", "veil-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		dir = tmp
	}
	rep := &demoReport{TrustDomain: "demo.veil.dev", PQMode: transport.PQStrict.String()}
	serverID := spiffeid.RequireFromString("spiffe://demo.veil.dev/echo")
	clientID := spiffeid.RequireFromString("spiffe://demo.veil.dev/ns/demo/sa/client")
	rep.ServerID, rep.ClientID = serverID.String(), clientID.String()

	ca, err := transport.InitCA(filepath.Join(dir, "ca"), rep.TrustDomain)
	if err != nil {
		return err
	}
	ids := map[string]spiffeid.ID{"server": serverID, "client": clientID, "intruder": spiffeid.RequireFromString("spiffe://demo.veil.dev/ns/other/sa/intruder")}
	srcs := map[string]transport.Source{}
	for name, id := range ids {
		if err := ca.IssueFiles(id, filepath.Join(dir, name), time.Hour); err != nil {
			return err
		}
		if err := rpc.IssueSealingIdentity(ca, id, filepath.Join(dir, name), time.Hour, nil); err != nil {
			return err
		}
		if srcs[name], err = transport.LoadFiles(filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	sealer, err := newSealingServer(filepath.Join(dir, "server"), "strict", nil, nil)
	if err != nil {
		return err
	}
	policy := rpc.NewPolicy().MustAllow("/"+echov1connect.EchoServiceName+"/*", "spiffe://demo.veil.dev/ns/demo/sa/*")
	srv, err := rpc.NewServer(srcs["server"], rpc.WithPQMode(transport.PQStrict), rpc.WithPolicy(policy), rpc.WithSealing(sealer),
		rpc.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err != nil {
		return err
	}
	rpc.Register[echov1connect.EchoServiceHandler](srv, echov1connect.NewEchoServiceHandler, echo.New())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	url := "https://" + ln.Addr().String()
	sctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(sctx, ln) }()
	defer func() {
		stop()
		<-done
	}()
	rep.SetupMillis = ms(time.Since(start))

	sealed, err := newSealingClient(filepath.Join(dir, "client"), pqkex.AuthorizeID(serverID.String()), true)
	if err != nil {
		return err
	}
	rep.PQSuite, rep.PQSeal = pqkex.X25519MLKEM768().Name(), "strict"
	hc := rpc.NewHTTPClient(srcs["client"], transport.AuthorizeID(serverID), rpc.WithClientPQMode(transport.PQStrict), rpc.WithClientSealing(sealed))
	var hsStart time.Time
	trace := &httptrace.ClientTrace{
		TLSHandshakeStart: func() { hsStart = time.Now() },
		TLSHandshakeDone: func(cs tls.ConnectionState, err error) {
			rep.Handshake = ms(time.Since(hsStart))
			if err == nil {
				rep.TLSVersion = tls.VersionName(cs.Version)
				rep.TLSGroup = cs.CurveID.String()
			}
		},
	}
	cctx := httptrace.WithClientTrace(ctx, trace)
	for _, p := range []struct {
		name string
		opts []connect.ClientOption
	}{{"connect", nil}, {"grpc", []connect.ClientOption{connect.WithGRPC()}}, {"grpc-web", []connect.ClientOption{connect.WithGRPCWeb()}}} {
		c := echov1connect.NewEchoServiceClient(hc, url, append(rpc.ClientOptions(), p.opts...)...)
		rep.Calls = append(rep.Calls, timed(p.name, "unary", func() error {
			res, err := c.Echo(cctx, connect.NewRequest(&echov1.EchoRequest{Message: "hello from " + p.name}))
			if err == nil && res.Msg.GetMessage() != "hello from "+p.name {
				err = errors.New("wrong echo")
			}
			return err
		}))
		rep.Calls = append(rep.Calls, timed(p.name, "server-stream", func() error {
			s, err := c.EchoStream(cctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: "tick", Count: 3}))
			if err != nil {
				return err
			}
			n := 0
			for s.Receive() {
				n++
			}
			if err := s.Err(); err != nil {
				return err
			}
			if n != 3 {
				return fmt.Errorf("got %d of 3 messages", n)
			}
			return nil
		}))
		if p.name == "grpc-web" {
			continue // gRPC-Web has no bidirectional streaming
		}
		rep.Calls = append(rep.Calls, timed(p.name, "bidi-stream", func() error {
			b := c.EchoBidi(cctx)
			if err := b.Send(&echov1.EchoBidiRequest{Message: "ping"}); err != nil {
				return err
			}
			m, err := b.Receive()
			if err != nil {
				return err
			}
			if m.GetMessage() != "ping" {
				return errors.New("wrong echo")
			}
			return b.CloseRequest()
		}))
	}

	// Refusals: a client without a certificate, and a verified client the policy denies.
	noCert := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}}}
	_, err = echov1connect.NewEchoServiceClient(noCert, url).Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
	rep.Refused = append(rep.Refused, demoRefusal{"client without a certificate", refusal(err)})
	unsealed := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(srcs["client"], transport.AuthorizeID(serverID)), url, rpc.ClientOptions()...)
	_, err = unsealed.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "in the clear"}))
	rep.Refused = append(rep.Refused, demoRefusal{"unsealed call to a PQ-seal strict server", refusal(err)})
	intruderSeal, err := newSealingClient(filepath.Join(dir, "intruder"), pqkex.AuthorizeID(serverID.String()), true)
	if err != nil {
		return err
	}
	intruder := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(srcs["intruder"], transport.AuthorizeID(serverID), rpc.WithClientSealing(intruderSeal)), url, rpc.ClientOptions()...)
	_, err = intruder.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "hi"}))
	rep.Refused = append(rep.Refused, demoRefusal{"spiffe://demo.veil.dev/ns/other/sa/intruder (not in policy)", refusal(err)})
	rep.TotalSeconds = time.Since(start).Seconds()

	for _, c := range rep.Calls {
		if !c.OK {
			_ = emit(stdout, *asJSON, rep, func(w io.Writer) { printDemo(w, rep) })
			return fmt.Errorf("demo call %s %s failed: %s", c.Protocol, c.Kind, c.Error)
		}
	}
	for _, r := range rep.Refused {
		if r.Result == "accepted" {
			return fmt.Errorf("demo: %s was accepted", r.Case)
		}
	}
	return emit(stdout, *asJSON, rep, func(w io.Writer) { printDemo(w, rep) })
}

func timed(protocol, kind string, f func() error) demoCall {
	t := time.Now()
	err := f()
	c := demoCall{Protocol: protocol, Kind: kind, OK: err == nil, Millis: ms(time.Since(t))}
	if err != nil {
		c.Error = err.Error()
	}
	return c
}

func refusal(err error) string {
	if err == nil {
		return "accepted"
	}
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Code() != connect.CodeUnavailable && ce.Code() != connect.CodeUnknown {
		return ce.Code().String() + ": " + ce.Message()
	}
	return "handshake refused: " + err.Error()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func printDemo(w io.Writer, r *demoReport) {
	fmt.Fprintf(w, "Veil demo: strict mutual TLS with SPIFFE identities, sealed end to end\n\n")
	fmt.Fprintf(w, "  trust domain   %s (throw-away CA: ECDSA P-256 root + ML-DSA-65 key)\n", r.TrustDomain)
	fmt.Fprintf(w, "  server         %s\n  client         %s\n", r.ServerID, r.ClientID)
	fmt.Fprintf(w, "  TLS            %s, key exchange %s (PQ %s), handshake %.2f ms\n", r.TLSVersion, r.TLSGroup, r.PQMode, r.Handshake)
	fmt.Fprintf(w, "  sealing        pqkex %s, %s: proxies see only ciphertext\n\n", r.PQSuite, r.PQSeal)
	fmt.Fprintf(w, "  %-9s %-14s %-6s %s\n", "protocol", "call", "result", "time")
	for _, c := range r.Calls {
		res := "ok"
		if !c.OK {
			res = "FAILED " + c.Error
		}
		fmt.Fprintf(w, "  %-9s %-14s %-6s %.2f ms\n", c.Protocol, c.Kind, res, c.Millis)
	}
	fmt.Fprintf(w, "\n  refused as they should be:\n")
	for _, rf := range r.Refused {
		fmt.Fprintf(w, "    %-58s %s\n", rf.Case, rf.Result)
	}
	fmt.Fprintf(w, "\n  setup %.0f ms, total %.2f s\n", r.SetupMillis, r.TotalSeconds)
}
