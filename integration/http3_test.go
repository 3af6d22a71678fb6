package integration

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// runOnce runs a one-shot command (veil call) in a container from the scratch image on
// network, waits for it to exit, and returns its exit code and output.
func runOnce(t *testing.T, network string, files map[string]string, args ...string) (int, string) {
	t.Helper()
	ctx := context.Background()
	req := testcontainers.ContainerRequest{
		FromDockerfile: testcontainers.FromDockerfile{Context: buildContext, Dockerfile: "Dockerfile", Repo: "veil-it", Tag: "latest", KeepImage: true},
		Cmd:            args,
		Networks:       []string{network},
		WaitingFor:     wait.ForExit().WithExitTimeout(2 * time.Minute),
	}
	for dst, src := range files {
		req.Files = append(req.Files, testcontainers.ContainerFile{HostFilePath: src, ContainerFilePath: dst, FileMode: 0o444})
	}
	c, err := testcontainers.GenericContainer(ctx, testcontainers.GenericContainerRequest{ContainerRequest: req, Started: true})
	if c != nil {
		t.Cleanup(func() { _ = c.Terminate(context.Background()) })
	}
	if err != nil {
		t.Fatalf("running %v: %v", args, err)
	}
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := c.Logs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	out, _ := io.ReadAll(rc)
	return st.ExitCode, string(out)
}

// TestHTTP3BetweenContainers: veil serve --http3 in one container, veil call in others
// on the same network. Directly, --http3 and --http3=auto go over HTTP/3 with the
// post-quantum group; through a relay that carries TCP only (UDP blocked on the path),
// --http3=auto falls back to HTTP/2 and says so, and --http3 alone fails.
func TestHTTP3BetweenContainers(t *testing.T) {
	dir, _ := identities(t, "spiffe://example.org/echo", "spiffe://example.org/client")
	nw := newNetwork(t)
	startVeil(t, containerSpec{
		alias:   "echo",
		network: nw,
		args: []string{"/veil", "serve", "--identity", "/identity", "--listen", ":8443", "--service", "echo",
			"--allow", "spiffe://example.org/client", "--http3"},
		files: identityFiles(dir, "echo"),
		port:  "8443/tcp",
	})
	startVeil(t, containerSpec{
		alias:   "tcponly",
		network: nw,
		args:    []string{"/testproxy", "--listen", ":8443", "--tcp-relay", "echo:8443"},
		port:    "8443/tcp",
		ready:   "testproxy relaying",
	})
	call := func(addr string, flags ...string) (int, string) {
		args := append([]string{"/veil", "call", "--identity", "/identity", "--addr", addr, "--server-id", "spiffe://example.org/echo", "-v"}, flags...)
		return runOnce(t, nw, identityFiles(dir, "client"), append(args, "/veil.echo.v1.EchoService/Echo", `{"message":"across containers"}`)...)
	}
	for _, c := range []struct {
		name, addr, flag, want string
	}{
		{"h3", "https://echo:8443", "--http3", "protocol: h3"},
		{"auto", "https://echo:8443", "--http3=auto", "protocol: h3"},
		{"auto through a TCP-only path", "https://tcponly:8443", "--http3=auto", "protocol: h2"},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, out := call(c.addr, c.flag)
			if code != 0 || !strings.Contains(out, `"across containers"`) || !strings.Contains(out, c.want) || !strings.Contains(out, "TLS 1.3 X25519MLKEM768") {
				t.Fatalf("exit %d:\n%s", code, out)
			}
			if fell := strings.Contains(out, "http3: fell back to HTTP/2"); fell != (c.want == "protocol: h2") {
				t.Fatalf("fallback reported %v:\n%s", fell, out)
			}
		})
	}
	t.Run("h3 only through a TCP-only path", func(t *testing.T) {
		if code, out := call("https://tcponly:8443", "--http3"); code == 0 {
			t.Fatalf("HTTP/3-only call succeeded without a UDP path:\n%s", out)
		}
	})
}
