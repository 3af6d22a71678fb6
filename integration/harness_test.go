// Package integration runs Veil's binaries in containers on private Docker networks
// and tests them across real processes and a real network. Images are built FROM
// scratch from static binaries (no registry is needed); containers are removed by the
// tests themselves (no reaper), and their logs are printed when a test fails.
package integration

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/network"
	"github.com/testcontainers/testcontainers-go/wait"
)

// buildContext is a Docker build context holding the static veil binary.
var buildContext string

func TestMain(m *testing.M) {
	// The reaper image (ryuk) would have to be pulled; the tests clean up instead.
	os.Setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
	// Published ports are reached on loopback. Left alone, testcontainers guesses the
	// Docker host from the engine's gateway, which on some hosts is not routable.
	if os.Getenv("TESTCONTAINERS_HOST_OVERRIDE") == "" {
		os.Setenv("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
	}
	dir, err := os.MkdirTemp("", "veil-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		os.Exit(1)
	}
	code := func() int {
		defer os.RemoveAll(dir)
		if err := buildImageContext(dir); err != nil {
			fmt.Fprintln(os.Stderr, "integration:", err)
			return 1
		}
		buildContext = dir
		return m.Run()
	}()
	os.Exit(code)
}

// buildImageContext builds static binaries of veil and the test proxy into dir, with
// a Dockerfile that copies them into an image FROM scratch.
func buildImageContext(dir string) error {
	for _, b := range []struct{ name, pkg, workdir string }{
		{"veil", "./cmd/veil", ".."},
		{"testproxy", "./testproxy", "."},
	} {
		cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, b.name), b.pkg)
		cmd.Dir = b.workdir
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("building a static %s binary: %v\n%s", b.name, err, out)
		}
	}
	// /data is an empty directory the unprivileged user owns, for services' stores.
	if err := os.Mkdir(filepath.Join(dir, "data"), 0o700); err != nil {
		return err
	}
	dockerfile := "FROM scratch\nCOPY veil /veil\nCOPY testproxy /testproxy\nCOPY --chown=65532:65532 data /data\nUSER 65532:65532\n"
	return os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(dockerfile), 0o644)
}

// newNetwork creates a private Docker network removed when the test ends.
func newNetwork(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	nw, err := network.New(ctx)
	if err != nil {
		t.Fatalf("docker network (is the Docker engine running?): %v", err)
	}
	t.Cleanup(func() { _ = nw.Remove(context.Background()) })
	return nw.Name
}

// veilContainer is one running `veil` process in a container.
type veilContainer struct {
	testcontainers.Container
	name string
}

// containerSpec describes a veil container: its command line, the host files copied
// into it, its network and alias, and the port to wait for.
type containerSpec struct {
	alias   string
	network string
	args    []string          // the command: "/veil" or "/testproxy" and its arguments
	files   map[string]string // container path -> host path
	port    string            // e.g. "8443/tcp"; empty for a client that listens on none
	root    bool              // run as root (for state copied in from the host, which root owns)
	ready   string            // a log line that says the process is ready (default "veil serving")
}

// startVeil starts a container from the scratch image and registers its removal (and
// a dump of its logs if the test failed).
func startVeil(t *testing.T, spec containerSpec) *veilContainer {
	t.Helper()
	ctx := context.Background()
	if spec.ready == "" {
		spec.ready = "veil serving"
	}
	req := testcontainers.ContainerRequest{
		FromDockerfile: testcontainers.FromDockerfile{
			Context:    buildContext,
			Dockerfile: "Dockerfile",
			Repo:       "veil-it",
			Tag:        "latest",
			KeepImage:  true,
		},
		Cmd:            spec.args,
		Networks:       []string{spec.network},
		NetworkAliases: map[string][]string{spec.network: {spec.alias}},
		ExposedPorts:   []string{spec.port},
		// Docker's port proxy accepts before the process listens, so wait for the
		// line veil logs once its socket is bound.
		WaitingFor: wait.ForAll(
			wait.ForLog(spec.ready),
			wait.ForListeningPort(spec.port).SkipInternalCheck(),
		).WithDeadline(60 * time.Second),
	}
	if spec.port == "" { // a client (veil analytics join): no port to wait for
		req.ExposedPorts, req.WaitingFor = nil, wait.ForLog(spec.ready).WithStartupTimeout(60*time.Second)
	}
	if spec.root {
		req.ConfigModifier = func(c *container.Config) { c.User = "0:0" }
	}
	for dst, src := range spec.files {
		// Readable by the container's unprivileged user; the host copies stay 0600.
		req.Files = append(req.Files, testcontainers.ContainerFile{HostFilePath: src, ContainerFilePath: dst, FileMode: 0o444})
	}
	c, err := testcontainers.GenericContainer(ctx, testcontainers.GenericContainerRequest{ContainerRequest: req, Started: true})
	vc := &veilContainer{Container: c, name: spec.alias}
	t.Cleanup(func() {
		if c == nil {
			return
		}
		if t.Failed() {
			vc.dumpLogs(t)
		}
		_ = c.Terminate(context.Background())
	})
	if err != nil {
		t.Fatalf("starting %s: %v", spec.alias, err)
	}
	return vc
}

func (c *veilContainer) dumpLogs(t *testing.T) {
	t.Helper()
	rc, err := c.Logs(context.Background())
	if err != nil {
		t.Logf("logs of %s: %v", c.name, err)
		return
	}
	defer rc.Close()
	b, _ := io.ReadAll(rc)
	t.Logf("---- logs of container %s ----\n%s", c.name, strings.TrimSpace(string(b)))
}

// endpoint returns the host address mapped to the container's port.
func (c *veilContainer) endpoint(t *testing.T, port string) string {
	t.Helper()
	ctx := context.Background()
	host, err := c.Host(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p, err := c.MappedPort(ctx, port)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%s:%s", host, p.Port())
}

// tlsState dials url with hc's TLS settings and returns the server certificate's
// expiry, so tests can watch a service's certificate rotate.
func tlsState(url string, hc *http.Client) (time.Time, error) {
	t, ok := hc.Transport.(*http.Transport)
	if !ok {
		return time.Time{}, fmt.Errorf("unexpected transport %T", hc.Transport)
	}
	cfg := t.TLSClientConfig.Clone()
	cfg.ClientSessionCache = nil // a full handshake shows the current certificate
	conn, err := tls.Dial("tcp", strings.TrimPrefix(url, "https://"), cfg)
	if err != nil {
		return time.Time{}, err
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].NotAfter, nil
}
