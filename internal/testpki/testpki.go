// Package testpki starts Veil servers for tests: a throw-away SPIFFE CA in a
// temporary directory, identities issued from it, and servers on loopback that shut
// down when the test ends.
package testpki

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// PKI is a throw-away CA and the directory its identities live in.
type PKI struct {
	CA  *pki.CA
	Dir string
}

// New creates a CA for trustDomain in a temporary directory.
func New(t testing.TB, trustDomain string) *PKI {
	t.Helper()
	dir := t.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), trustDomain)
	if err != nil {
		t.Fatal(err)
	}
	return &PKI{CA: ca, Dir: dir}
}

// Identity issues (once per call) and loads an identity for the SPIFFE ID id.
func (p *PKI) Identity(t testing.TB, id string) transport.Source {
	t.Helper()
	out := filepath.Join(p.Dir, strings.NewReplacer("spiffe://", "", "/", "_").Replace(id))
	if err := p.CA.IssueFiles(spiffeid.RequireFromString(id), out, time.Hour); err != nil {
		t.Fatal(err)
	}
	src, err := transport.LoadFiles(out)
	if err != nil {
		t.Fatal(err)
	}
	return src
}

// Server is a running test server.
type Server struct {
	URL  string
	ID   string
	stop func()
}

// Stop shuts the server down and waits for it (also done when the test ends).
func (s *Server) Stop() { s.stop() }

// Serve starts a server with identity serverID on a loopback port; register mounts
// its services. It stops when the test ends or Stop is called.
func (p *PKI) Serve(t testing.TB, serverID string, register func(*rpc.Server), opts ...rpc.ServerOption) *Server {
	t.Helper()
	srv, err := rpc.NewServer(p.Identity(t, serverID), append([]rpc.ServerOption{rpc.WithGracePeriod(5 * time.Second)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	register(srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	stopped := false
	s := &Server{URL: "https://" + ln.Addr().String(), ID: serverID}
	s.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server %s: %v", serverID, err)
		}
	}
	t.Cleanup(s.Stop)
	return s
}

// Client returns an HTTP client with identity clientID that accepts only s.
func (p *PKI) Client(t testing.TB, clientID string, s *Server) *http.Client {
	t.Helper()
	return rpc.NewHTTPClient(p.Identity(t, clientID), transport.AuthorizeID(spiffeid.RequireFromString(s.ID)))
}
