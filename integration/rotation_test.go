package integration

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	tcexec "github.com/testcontainers/testcontainers-go/exec"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/ca"
	"github.com/veilrpc/veil/transport"
)

// TestRotationUnderLoadAcrossContainers: a service in a container and the test's
// client both hold 10-second certificates from the online CA (in another container)
// and renew them as they go, while the client drives steady load with 64 callers;
// meanwhile the root is rotated (prepare, activate, finish) inside the CA's container.
// Not one call may fail.
func TestRotationUnderLoadAcrossContainers(t *testing.T) {
	dir, authority := identities(t)
	caDir := filepath.Join(dir, "ca")
	tokens := map[string]string{}
	for _, id := range []string{"spiffe://example.org/echo", "spiffe://example.org/client"} {
		tok, err := ca.NewToken(caDir, id, 10*time.Minute, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		tokens[id] = tok
	}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(tokens["spiffe://example.org/echo"]), 0o600); err != nil {
		t.Fatal(err)
	}
	nw := newNetwork(t)
	caC := startVeil(t, containerSpec{
		alias: "ca", network: nw, port: "8443/tcp", ready: "veil ca serving", root: true,
		args:  []string{"/veil", "ca", "serve", "--dir", "/data/ca", "--listen", ":8443", "--dns", "ca", "--max-ttl", "1h", "--rate", "100", "--burst", "100"},
		files: caFiles(t, caDir),
	})
	echoC := startVeil(t, containerSpec{
		alias: "echo", network: nw, port: "8443/tcp",
		args: []string{"/veil", "serve", "--ca", "https://ca:8443", "--ca-bundle", "/identity/ca.crt", "--join-token", "@/identity/token",
			"--id", "spiffe://example.org/echo", "--cert-ttl", "10s", "--listen", ":8443", "--service", "echo", "--allow", "spiffe://example.org/client"},
		files: map[string]string{"/identity/ca.crt": filepath.Join(caDir, "root.crt"), "/identity/token": tokenFile},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	bundle := x509bundle.FromX509Authorities(authority.TrustDomain(), []*x509.Certificate{authority.Root()})
	src, err := transport.NewRenewingSource(ctx, ca.NewClient("https://"+caC.endpoint(t, "8443/tcp"), bundle, tokens["spiffe://example.org/client"]),
		spiffeid.RequireFromString("spiffe://example.org/client"),
		transport.WithCertTTL(10*time.Second), transport.WithTrustRefresh(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	hc := rpc.NewHTTPClient(src, transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/echo")))
	echo := echov1connect.NewEchoServiceClient(hc, "https://"+echoC.endpoint(t, "8443/tcp"), rpc.ClientOptions()...)

	var calls, failures atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := echo.Echo(cctx, connect.NewRequest(&echov1.EchoRequest{Message: "rotate"}))
				ccancel()
				calls.Add(1)
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		}()
	}
	rotate := func(step string) error {
		code, out, err := caC.Exec(ctx, []string{"/veil", "ca", "rotate", "--dir", "/data/ca", "--step", step}, tcexec.Multiplexed())
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(out)
		if code != 0 {
			return fmt.Errorf("veil ca rotate --step %s: exit %d: %s", step, code, b)
		}
		t.Logf("rotate %s: %s", step, b)
		return nil
	}
	steps := func() error {
		time.Sleep(5 * time.Second) // steady load with leaves rotating every few seconds
		if err := rotate("prepare"); err != nil {
			return err
		}
		time.Sleep(12 * time.Second) // every workload learns the two-root bundle
		if err := rotate("activate"); err != nil {
			return err
		}
		time.Sleep(12 * time.Second) // every leaf is re-issued from the new root
		var err error
		for range 30 { // finish refuses while a leaf of the old root may be valid
			if err = rotate("finish"); err == nil {
				break
			}
			time.Sleep(time.Second)
		}
		if err != nil {
			return err
		}
		time.Sleep(8 * time.Second) // load after the old root is gone
		return nil
	}
	stepErr := steps()
	close(stop)
	wg.Wait()
	if stepErr != nil {
		t.Fatal(stepErr)
	}
	t.Logf("%d calls, %d failed", calls.Load(), failures.Load())
	if failures.Load() != 0 {
		t.Fatalf("%d of %d calls failed during rotation; first: %v", failures.Load(), calls.Load(), firstErr.Load())
	}
	if calls.Load() < 1000 {
		t.Fatalf("only %d calls: the load was not steady", calls.Load())
	}
}
