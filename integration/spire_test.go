package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// spireVersion is the SPIRE release the test runs, pinned in tools/spire/go.mod.
const spireVersion = "v1.13.3"

// spireBinaries returns spire-server and spire-agent, building them from the module
// proxy into the git-ignored .cache/spire/VERSION the first time (several minutes).
func spireBinaries(t *testing.T) (server, agent string) {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", ".cache", "spire", spireVersion))
	if err != nil {
		t.Fatal(err)
	}
	server, agent = filepath.Join(dir, "spire-server"), filepath.Join(dir, "spire-agent")
	_, errS := os.Stat(server)
	_, errA := os.Stat(agent)
	if errS == nil && errA == nil {
		return server, agent
	}
	t.Logf("building SPIRE %s into %s (cached for later runs)", spireVersion, dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Built into a temporary directory and renamed, so that an interrupted build
	// never leaves a half-written binary in the cache.
	tmp, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	cmd := exec.Command("go", "build", "-o", tmp+"/", "github.com/spiffe/spire/cmd/spire-server", "github.com/spiffe/spire/cmd/spire-agent")
	cmd.Dir = filepath.Join("..", "tools", "spire")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building SPIRE: %v\n%s", err, out)
	}
	for _, b := range []string{"spire-server", "spire-agent"} {
		if err := os.Rename(filepath.Join(tmp, b), filepath.Join(dir, b)); err != nil {
			t.Fatal(err)
		}
	}
	return server, agent
}

// startProcess runs a command until the test ends, keeping its output for failures.
func startProcess(t *testing.T, name string, cmd *exec.Cmd) {
	t.Helper()
	startProcessTo(t, name, cmd, &lockedBuffer{})
}

// poll runs f until it succeeds or limit passes.
func poll(t *testing.T, what string, limit time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	var err error
	for {
		if err = f(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
}

// TestSPIRE runs a real spire-server and spire-agent (join_token node attestation,
// unix workload attestation by binary path). `veil serve --spiffe-socket` gets its
// SVID from the agent's Workload API; a client whose SVID comes from the same agent
// calls it over mutual TLS. SVIDs live 30 s, so the test also sees the server's
// certificate rotate through the Workload API while it keeps serving.
func TestSPIRE(t *testing.T) {
	serverBin, agentBin := spireBinaries(t)
	veilBin := filepath.Join(buildContext, "veil")
	// Selectors match the path the kernel reports for the process: no symlinks.
	var err error
	for _, p := range []*string{&agentBin, &veilBin} {
		if *p, err = filepath.EvalSymlinks(*p); err != nil {
			t.Fatal(err)
		}
	}
	dir, err := os.MkdirTemp("", "spire") // unix socket paths must stay short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	port := freePort(t)
	serverSock, agentSock := filepath.Join(dir, "server.sock"), filepath.Join(dir, "agent.sock")
	serverConf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%s"
  socket_path = "%s"
  trust_domain = "example.org"
  data_dir = "%s/server-data"
  log_level = "WARN"
  default_x509_svid_ttl = "30s"
  ca_ttl = "1h"
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = "%s/datastore.sqlite3"
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
}
`, port, serverSock, dir, dir)
	agentConf := fmt.Sprintf(`agent {
  data_dir = "%s/agent-data"
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "%s"
  socket_path = "%s"
  trust_domain = "example.org"
  insecure_bootstrap = true
}
plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
  WorkloadAttestor "unix" {
    plugin_data {
      discover_workload_path = true
      workload_size_limit = -1
    }
  }
}
`, dir, port, agentSock)
	for name, conf := range map[string]string{"server.conf": serverConf, "agent.conf": agentConf} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	startProcess(t, "spire-server", exec.Command(serverBin, "run", "-config", filepath.Join(dir, "server.conf")))
	spire := func(args ...string) (string, error) {
		out, err := exec.Command(serverBin, append(args, "-socketPath", serverSock)...).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("spire-server %s: %v: %s", args[0], err, out)
		}
		return string(out), nil
	}
	poll(t, "spire-server healthy", 60*time.Second, func() error { _, err := spire("healthcheck"); return err })

	out, err := spire("token", "generate", "-spiffeID", "spiffe://example.org/node1", "-ttl", "600")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`Token: (\S+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no token in %q", out)
	}
	startProcess(t, "spire-agent", exec.Command(agentBin, "run", "-config", filepath.Join(dir, "agent.conf"), "-joinToken", m[1]))

	// Workloads are told apart by their binary: veil is the server; the client's
	// SVID is fetched by spire-agent itself, so the agent binary is the client.
	for id, path := range map[string]string{"spiffe://example.org/echo": veilBin, "spiffe://example.org/client": agentBin} {
		if _, err := spire("entry", "create", "-parentID", "spiffe://example.org/node1", "-spiffeID", id,
			"-selector", "unix:path:"+path, "-x509SVIDTTL", "30"); err != nil {
			t.Fatal(err)
		}
	}
	fetchClient := func() (transport.StaticSource, error) {
		out := filepath.Join(dir, "client")
		_ = os.RemoveAll(out)
		if err := os.Mkdir(out, 0o700); err != nil {
			return transport.StaticSource{}, err
		}
		if b, err := exec.Command(agentBin, "api", "fetch", "x509", "-socketPath", agentSock, "-write", out).CombinedOutput(); err != nil {
			return transport.StaticSource{}, fmt.Errorf("%v: %s", err, b)
		}
		svid, err := x509svid.Load(filepath.Join(out, "svid.0.pem"), filepath.Join(out, "svid.0.key"))
		if err != nil {
			return transport.StaticSource{}, err
		}
		bundle, err := x509bundle.Load(svid.ID.TrustDomain(), filepath.Join(out, "bundle.0.pem"))
		if err != nil {
			return transport.StaticSource{}, err
		}
		return transport.StaticSource{SVID: svid, Bundles: x509bundle.NewSet(bundle)}, nil
	}
	var client transport.StaticSource
	// The agent needs a few seconds to attest and sync the entries.
	poll(t, "client SVID from the agent", 90*time.Second, func() error { client, err = fetchClient(); return err })
	if client.SVID.ID.String() != "spiffe://example.org/client" {
		t.Fatalf("client SVID is %s", client.SVID.ID)
	}

	addr := "127.0.0.1:" + freePort(t)
	veilOut := &lockedBuffer{}
	serve := exec.Command(veilBin, "serve", "--spiffe-socket", agentSock, "--spiffe-timeout", "90s", "--listen", addr,
		"--service", "echo", "--allow", "spiffe://example.org/client")
	startProcessTo(t, "veil serve", serve, veilOut)
	poll(t, "veil serve listening", 120*time.Second, func() error {
		if !strings.Contains(veilOut.String(), "veil serving") {
			return fmt.Errorf("not ready")
		}
		return nil
	})

	echoID := spiffeid.RequireFromString("spiffe://example.org/echo")
	serverLeaf := func(src transport.Source) (string, error) {
		cfg := transport.ClientConfig(src, transport.WithAuthorizer(transport.AuthorizeID(echoID)))
		cfg.ClientSessionCache = nil
		conn, err := tls.Dial("tcp", addr, cfg)
		if err != nil {
			return "", err
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.Text(16), nil
	}
	call := func(src transport.Source) error {
		hc := rpc.NewHTTPClient(src, transport.AuthorizeID(echoID))
		defer hc.CloseIdleConnections()
		res, err := echov1connect.NewEchoServiceClient(hc, "https://"+addr, rpc.ClientOptions()...).
			Echo(context.Background(), connect.NewRequest(&echov1.EchoRequest{Message: "spire"}))
		if err != nil {
			return err
		}
		if res.Msg.GetMessage() != "spire" {
			return fmt.Errorf("echo returned %q", res.Msg.GetMessage())
		}
		return nil
	}
	if err := call(client); err != nil {
		t.Fatalf("call with SPIRE identities: %v", err)
	}
	first, err := serverLeaf(client)
	if err != nil {
		t.Fatal(err)
	}
	// SPIRE renews a 30 s SVID at half its life; veil serve picks it up at once.
	poll(t, "the server's SVID to rotate", 60*time.Second, func() error {
		if client, err = fetchClient(); err != nil {
			return err
		}
		s, err := serverLeaf(client)
		if err != nil {
			return err
		}
		if s == first {
			return fmt.Errorf("still serving %s", s)
		}
		return nil
	})
	if err := call(client); err != nil {
		t.Fatalf("call after rotation: %v", err)
	}
	// A client that is not in the trust domain's bundle is refused.
	other, err := pki.InitCA(filepath.Join(dir, "other-ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	if err := other.IssueFiles(spiffeid.RequireFromString("spiffe://example.org/client"), filepath.Join(dir, "impostor"), time.Hour); err != nil {
		t.Fatal(err)
	}
	impostor, err := transport.LoadFiles(filepath.Join(dir, "impostor"))
	if err != nil {
		t.Fatal(err)
	}
	if err := call(impostor); err == nil {
		t.Fatal("a client from another CA was accepted")
	}
}

// lockedBuffer is an io.Writer whose content can be read while a process writes it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startProcessTo runs a command until the test ends, writing its output into out,
// which the test may read and which is logged if the test fails.
func startProcessTo(t *testing.T, name string, cmd *exec.Cmd, out *lockedBuffer) {
	t.Helper()
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			sc := bufio.NewScanner(strings.NewReader(out.String()))
			for sc.Scan() {
				t.Logf("%s: %s", name, sc.Text())
			}
		}
	})
}
