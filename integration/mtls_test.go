package integration

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// identities creates a CA and issues the named SPIFFE IDs into a temporary directory.
func identities(t *testing.T, ids ...string) (string, *pki.CA) {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		name := id[strings.LastIndex(id, "/")+1:]
		if err := ca.IssueFiles(spiffeid.RequireFromString(id), filepath.Join(dir, name), time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	return dir, ca
}

func identityFiles(dir, name string) map[string]string {
	return map[string]string{
		"/identity/tls.crt": filepath.Join(dir, name, "tls.crt"),
		"/identity/tls.key": filepath.Join(dir, name, "tls.key"),
		"/identity/ca.crt":  filepath.Join(dir, name, "ca.crt"),
	}
}

// TestEchoInContainerOverStrictMTLS runs `veil serve` in a container on a private
// network with mounted identity files and calls it over mutual TLS with each protocol;
// a client without a certificate, with a foreign CA, or with a disallowed ID is refused.
func TestEchoInContainerOverStrictMTLS(t *testing.T) {
	dir, _ := identities(t, "spiffe://example.org/echo", "spiffe://example.org/client", "spiffe://example.org/intruder")
	c := startVeil(t, containerSpec{
		alias:   "echo",
		network: newNetwork(t),
		args: []string{"/veil", "serve", "--identity", "/identity", "--listen", ":8443", "--service", "echo",
			"--pq", "strict", "--allow", "spiffe://example.org/client"},
		files: identityFiles(dir, "echo"),
		port:  "8443/tcp",
	})
	url := "https://" + c.endpoint(t, "8443/tcp")
	serverID := transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/echo"))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	client := loadSource(t, filepath.Join(dir, "client"))
	for _, p := range []struct {
		name string
		opts []connect.ClientOption
	}{{"connect", nil}, {"grpc", []connect.ClientOption{connect.WithGRPC()}}, {"grpcweb", []connect.ClientOption{connect.WithGRPCWeb()}}} {
		t.Run(p.name, func(t *testing.T) {
			ec := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(client, serverID, rpc.WithPQMode(transport.PQStrict)), url, append(rpc.ClientOptions(), p.opts...)...)
			res, err := ec.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "across containers via " + p.name}))
			if err != nil || res.Msg.GetMessage() != "across containers via "+p.name {
				t.Fatalf("Echo = %v, %v", res, err)
			}
			stream, err := ec.EchoStream(ctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: "s", Count: 10}))
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for stream.Receive() {
				n++
			}
			if stream.Err() != nil || n != 10 {
				t.Fatalf("stream: %d messages, %v", n, stream.Err())
			}
		})
	}

	t.Run("no client certificate", func(t *testing.T) {
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}}}
		res, err := hc.Post(url+"/veil.echo.v1.EchoService/Echo", "application/json", strings.NewReader(`{"message":"x"}`))
		if err == nil {
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			t.Fatalf("answered %d %s", res.StatusCode, body)
		}
	})
	t.Run("foreign CA", func(t *testing.T) {
		foreignDir, _ := identities(t, "spiffe://example.org/client")
		foreign := loadSource(t, filepath.Join(foreignDir, "client"))
		// Trust the real server but present a certificate from another CA.
		mixed := transport.StaticSource{SVID: mustSVID(t, foreign), Bundles: mustBundles(t, client)}
		ec := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(mixed, serverID), url, rpc.ClientOptions()...)
		_, err := ec.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "x"}))
		if err == nil || connect.CodeOf(err) == connect.CodePermissionDenied {
			t.Fatalf("err = %v, want a refused handshake", err)
		}
	})
	t.Run("disallowed SPIFFE ID", func(t *testing.T) {
		intruder := loadSource(t, filepath.Join(dir, "intruder"))
		ec := echov1connect.NewEchoServiceClient(rpc.NewHTTPClient(intruder, serverID), url, rpc.ClientOptions()...)
		_, err := ec.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "x"}))
		if connect.CodeOf(err) != connect.CodePermissionDenied {
			t.Fatalf("err = %v, want permission_denied", err)
		}
	})
	t.Run("classic-only client under PQ strict", func(t *testing.T) {
		cfg := transport.ClientConfig(client, transport.WithAuthorizer(serverID))
		cfg.CurvePreferences = []tls.CurveID{tls.X25519}
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}}
		res, err := hc.Post(url+"/veil.echo.v1.EchoService/Echo", "application/json", strings.NewReader(`{"message":"x"}`))
		if err == nil {
			res.Body.Close()
			t.Fatalf("classic-only handshake answered %d", res.StatusCode)
		}
		if !strings.Contains(err.Error(), "handshake failure") {
			t.Fatalf("err = %v, want a handshake_failure alert", err)
		}
	})
}

func loadSource(t *testing.T, dir string) *transport.FileSource {
	t.Helper()
	src, err := transport.LoadFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	return src
}

var errNoSVID = errors.New("no SVID")

func mustSVID(t *testing.T, s transport.Source) *x509svidSVID {
	t.Helper()
	svid, err := s.GetX509SVID()
	if err != nil || svid == nil {
		t.Fatal(errors.Join(errNoSVID, err))
	}
	return svid
}
