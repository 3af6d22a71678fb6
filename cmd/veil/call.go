package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/veilrpc/veil/rpc"

	// Compiled-in services, resolvable by procedure name.
	_ "github.com/veilrpc/veil/gen/veil/echo/v1"
)

func runCall(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("call", "call --identity DIR --addr URL [--server-id ID] [--pq-seal on|proxied|off] [--pq-suite SUITE] [--http3[=auto]] [-v] PROCEDURE JSON\n\nPROCEDURE: package.Service/Method as grpcurl takes it (or /package.Service/Method)", stderr)
	identity := fs.String("identity", "", "identity directory (tls.crt, tls.key, ca.crt; pq.cred, pq.key for sealing)")
	addr := fs.String("addr", "", "server base URL, e.g. https://127.0.0.1:8443")
	serverID := fs.String("server-id", "", "SPIFFE ID the server must have (default: any ID in the identity's trust domain)")
	seal := addClientSeal(fs)
	var suite suiteFlag
	fs.Var(&suite, "pq-suite", pqSuiteUsage+"; when set, only a server of that suite is called (reason suite_policy)")
	protocol := fs.String("protocol", "connect", "connect, grpc or grpcweb")
	verbose := fs.Bool("v", false, "print the negotiated protocol (h3 or h2), TLS group and sealing suite to stderr")
	h3 := addHTTP3Flag(fs)
	tokens := addTokenClientFlags(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, errHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if err := required(fs, "identity", "addr"); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		return fmt.Errorf("%w: veil call needs PROCEDURE and JSON, e.g. veil.echo.v1.EchoService/Echo '{\"message\":\"hi\"}'", errUsage)
	}
	method, procedure, err := findMethod(fs.Arg(0))
	if err != nil {
		return err
	}
	body := fs.Arg(1)
	if method.IsStreamingClient() {
		return fmt.Errorf("%w: %s takes a request stream; veil call sends one message", errUsage, procedure)
	}
	req := dynamicpb.NewMessage(method.Input())
	if err := protojson.Unmarshal([]byte(body), req); err != nil {
		return fmt.Errorf("%w: request JSON for %s: %v", errUsage, method.Input().FullName(), err)
	}

	copts := h3.options()
	if *verbose {
		copts = append(copts, connReport(stderr))
	}
	hc, sealed, err := newIdentityClient(*identity, *serverID, *seal, copts, suite.policy()...)
	if err != nil {
		return err
	}
	tokenOpts, _, err := tokens.options(*identity, *serverID, *seal)
	if err != nil {
		return err
	}

	connectOpts := append(append(rpc.ClientOptions(), tokenOpts...),
		connect.WithSchema(method),
		connect.WithResponseInitializer(func(_ connect.Spec, msg any) error {
			if m, ok := msg.(*dynamicpb.Message); ok {
				*m = *dynamicpb.NewMessage(method.Output())
			}
			return nil
		}))
	switch *protocol {
	case "connect":
	case "grpc":
		connectOpts = append(connectOpts, connect.WithGRPC())
	case "grpcweb":
		connectOpts = append(connectOpts, connect.WithGRPCWeb())
	default:
		return fmt.Errorf("%w: --protocol %q: want connect, grpc or grpcweb", errUsage, *protocol)
	}
	if *verbose {
		if sealed {
			fmt.Fprintf(stderr, "pq-seal: on (%s)\n", identitySuite(*identity))
		} else {
			fmt.Fprintln(stderr, "pq-seal: off")
		}
	}
	if *verbose {
		defer h3.report(stderr)
	}
	client := connect.NewClient[dynamicpb.Message, dynamicpb.Message](hc, strings.TrimSuffix(*addr, "/")+procedure, connectOpts...)
	marshal := protojson.MarshalOptions{Multiline: true}
	if method.IsStreamingServer() {
		stream, err := client.CallServerStream(ctx, connect.NewRequest(req))
		if err != nil {
			return err
		}
		for stream.Receive() {
			b, err := marshal.Marshal(stream.Msg())
			if err != nil {
				return err
			}
			fmt.Fprintln(stdout, string(b))
		}
		return stream.Err()
	}
	res, err := client.CallUnary(ctx, connect.NewRequest(req))
	if err != nil {
		return err
	}
	b, err := marshal.Marshal(res.Msg)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(stdout, string(b))
	return err
}

// findMethod resolves a procedure among the compiled-in services. It takes the forms
// grpcurl and buf curl take, "package.Service/Method" and "package.Service.Method", and
// the path form "/package.Service/Method"; it returns the method and its path. A
// procedure that is not compiled in is a usage error listing the ones that are.
func findMethod(procedure string) (protoreflect.MethodDescriptor, string, error) {
	name := strings.TrimPrefix(procedure, "/")
	svcName, methodName, ok := strings.Cut(name, "/")
	if !ok {
		// package.Service.Method
		if i := strings.LastIndexByte(name, '.'); i > 0 {
			svcName, methodName, ok = name[:i], name[i+1:], true
		}
	}
	if !ok || svcName == "" || methodName == "" || strings.Contains(methodName, "/") {
		return nil, "", fmt.Errorf("%w: procedure %q: want package.Service/Method (or /package.Service/Method)", errUsage, procedure)
	}
	if d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(svcName)); err == nil {
		if svc, ok := d.(protoreflect.ServiceDescriptor); ok {
			if m := svc.Methods().ByName(protoreflect.Name(methodName)); m != nil {
				return m, "/" + svcName + "/" + methodName, nil
			}
		}
	}
	return nil, "", fmt.Errorf("%w: procedure %q is not compiled into veil; veil call knows:\n  %s", errUsage, procedure, strings.Join(callableProcedures(), "\n  "))
}

// callableProcedures lists, sorted, the procedures of the compiled-in Veil services
// (packages veil.*; the registry also holds clients' services, such as the SPIFFE
// Workload API) that veil call can send: one request message, unary or server-streaming.
func callableProcedures() []string {
	var out []string
	protoregistry.GlobalFiles.RangeFiles(func(f protoreflect.FileDescriptor) bool {
		if !strings.HasPrefix(string(f.Package()), "veil.") {
			return true
		}
		for i := 0; i < f.Services().Len(); i++ {
			svc := f.Services().Get(i)
			for j := 0; j < svc.Methods().Len(); j++ {
				if m := svc.Methods().Get(j); !m.IsStreamingClient() {
					out = append(out, string(svc.FullName())+"/"+string(m.Name()))
				}
			}
		}
		return true
	})
	slices.Sort(out)
	return out
}
