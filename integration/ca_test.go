package integration

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/ca"
	"github.com/veilrpc/veil/transport"
)

// caFiles maps every file of a host CA directory into the container's /data/ca.
func caFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		files["/data/ca/"+filepath.ToSlash(rel)] = path
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// TestCAOutage runs the online CA and a service that joined it with a token, in
// containers. The CA is stopped past the service's renewal point: the service keeps
// serving and reports NOT_SERVING before its certificate expires; the CA comes back
// and the service renews, healthy again, without a restart.
func TestCAOutage(t *testing.T) {
	dir, _ := identities(t, "spiffe://example.org/client")
	caDir := filepath.Join(dir, "ca")
	token, err := ca.NewToken(caDir, "spiffe://example.org/echo", 10*time.Minute, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	nw := newNetwork(t)
	caC := startVeil(t, containerSpec{
		alias: "ca", network: nw, port: "8443/tcp", ready: "veil ca serving", root: true,
		args:  []string{"/veil", "ca", "serve", "--dir", "/data/ca", "--listen", ":8443", "--dns", "ca", "--max-ttl", "1h"},
		files: caFiles(t, caDir),
	})
	// 60 s certificates, renewed 40 s before expiry, NOT_SERVING with less than 30 s
	// left: the outage below spans the renewal point and the degradation point.
	echoC := startVeil(t, containerSpec{
		alias: "echo", network: nw, port: "8443/tcp",
		args: []string{"/veil", "serve", "--ca", "https://ca:8443", "--ca-bundle", "/identity/ca.crt", "--join-token", "@/identity/token",
			"--id", "spiffe://example.org/echo", "--cert-ttl", "60s", "--renew-before", "40s", "--degrade-below", "30s",
			"--listen", ":8443", "--service", "echo", "--allow", "spiffe://example.org/client"},
		files: map[string]string{"/identity/ca.crt": filepath.Join(caDir, "root.crt"), "/identity/token": tokenFile},
	})
	url := "https://" + echoC.endpoint(t, "8443/tcp")
	hc := rpc.NewHTTPClient(loadSource(t, filepath.Join(dir, "client")), transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/echo")))
	echo := echov1connect.NewEchoServiceClient(hc, url, rpc.ClientOptions()...)
	health := grpchealth.NewClient(hc, url)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	status := func() grpchealth.Status {
		res, err := health.Check(ctx, &grpchealth.CheckRequest{})
		if err != nil {
			t.Fatalf("health check: %v", err)
		}
		return res.Status
	}
	call := func() {
		if _, err := echo.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "still here"})); err != nil {
			t.Fatalf("call: %v", err)
		}
	}
	call()
	if s := status(); s != grpchealth.StatusServing {
		t.Fatalf("health %v before the outage", s)
	}
	expiry := func() time.Time {
		cs, err := tlsState(url, hc)
		if err != nil {
			t.Fatal(err)
		}
		return cs
	}
	first := expiry()
	before, err := echoC.State(ctx)
	if err != nil {
		t.Fatal(err)
	}

	stop := 10 * time.Second
	if err := caC.Stop(ctx, &stop); err != nil {
		t.Fatal(err)
	}
	// Serving continues; health degrades before the certificate expires.
	degraded := false
	for time.Until(first) > 2*time.Second {
		call()
		if status() == grpchealth.StatusNotServing {
			degraded = true
			break
		}
		time.Sleep(time.Second)
	}
	if !degraded {
		t.Fatalf("health never degraded before the certificate expired at %s", first)
	}
	if !time.Now().Before(first) {
		t.Fatal("degraded only after expiry")
	}
	if err := caC.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// Renewal succeeds once the CA is back: healthy again with a new certificate, no
	// restart of the service.
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(time.Second) {
		if status() == grpchealth.StatusServing && expiry().After(first) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no renewal after the CA returned (certificate still expires at %s)", first)
		}
	}
	call()
	if st, err := echoC.State(ctx); err != nil || !st.Running || st.StartedAt != before.StartedAt {
		t.Fatalf("the service restarted: started %v, then %v (%v)", before.StartedAt, st.StartedAt, err)
	}
}
