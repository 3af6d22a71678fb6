package integration

// A NATS JetStream cluster in containers, for the tests of Veil's shared state.
//
// startNATSCluster starts n nats-server nodes (the release pinned in tools/nats/go.mod,
// built static into ../.cache/nats/VERSION on first use) from an image FROM scratch on
// a private Docker network. Every node has JetStream with file storage in its
// container's /data (kept across stop/kill and start), routes to every other node, and
// TLS on both ports with a certificate issued by the Veil CA the test passes in:
//
//   - client port 4222: TLS required, `verify: true`, so a client must present a
//     certificate that chains to that CA (a Veil workload's X.509 SVID does); published
//     on 127.0.0.1 at a port that stays the same across restarts;
//   - route port 6222: TLS with `verify: true` both ways, nodes named by their aliases;
//   - monitoring port 8222: plain HTTP, published on 127.0.0.1 (healthz and jsz only).
//
// Node i is called nats-i: its network alias, its server_name, and a DNS SAN of its
// certificate, which also names localhost and 127.0.0.1 for clients in the test
// process. Cluster routes do not advertise the nodes' container addresses to clients
// (no_advertise), so clients use the URLs they are given: url() inside the network,
// hostURL() from the test process.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	dockernetwork "github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"

	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/transport"
)

// natsVersion is the nats-server release the tests run: the one pinned in
// tools/nats/go.mod and NATS_VERSION in the Makefile.
const natsVersion = "v2.15.2"

const (
	natsClientPort  = "4222/tcp"
	natsMonitorPort = "8222/tcp"
)

var natsImage struct {
	once sync.Once
	dir  string // Docker build context: Dockerfile and nats-server
	err  error
}

// natsImageContext returns the build context of the nats-server image, building the
// static nats-server into ../.cache/nats/VERSION the first time (minutes, cold).
func natsImageContext(t *testing.T) string {
	t.Helper()
	natsImage.once.Do(func() { natsImage.dir, natsImage.err = buildNATSImageContext(t) })
	if natsImage.err != nil {
		t.Fatal(natsImage.err)
	}
	return natsImage.dir
}

func buildNATSImageContext(t *testing.T) (string, error) {
	dir, err := filepath.Abs(filepath.Join("..", ".cache", "nats", natsVersion))
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "nats-server")
	if _, err := os.Stat(bin); err != nil {
		t.Logf("building nats-server %s into %s (cached for later runs)", natsVersion, dir)
		started := time.Now()
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", err
		}
		// Built into a temporary directory and renamed, so that an interrupted build
		// never leaves a half-written binary in the cache.
		tmp, err := os.MkdirTemp(dir, ".build-")
		if err != nil {
			return "", err
		}
		defer os.RemoveAll(tmp)
		cmd := exec.Command("go", "build", "-trimpath", "-o", tmp+"/", "github.com/nats-io/nats-server/v2")
		cmd.Dir = filepath.Join("..", "tools", "nats")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("building nats-server: %v\n%s", err, out)
		}
		if err := os.Rename(filepath.Join(tmp, "nats-server"), bin); err != nil {
			return "", err
		}
		t.Logf("built nats-server in %s", time.Since(started).Round(time.Second))
	}
	// The context holds only the binary, a Dockerfile and an empty data directory.
	ctxDir := filepath.Join(dir, "image")
	if err := os.MkdirAll(filepath.Join(ctxDir, "data"), 0o700); err != nil {
		return "", err
	}
	if err := linkFile(bin, filepath.Join(ctxDir, "nats-server")); err != nil {
		return "", err
	}
	dockerfile := "FROM scratch\nCOPY nats-server /nats-server\nCOPY --chown=65532:65532 data /data\nUSER 65532:65532\nENTRYPOINT [\"/nats-server\"]\n"
	if err := os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
		return "", err
	}
	return ctxDir, nil
}

// linkFile makes dst the same file as src: a hard link, or a copy across file systems.
func linkFile(src, dst string) error {
	a, err := os.Stat(src)
	if err != nil {
		return err
	}
	if b, err := os.Stat(dst); err == nil && os.SameFile(a, b) {
		return nil
	}
	tmp := dst + ".tmp"
	_ = os.Remove(tmp)
	if err := os.Link(src, tmp); err != nil {
		in, err := os.Open(src)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
		if err != nil {
			return err
		}
		if _, err := io.Copy(out, in); err != nil {
			out.Close()
			return err
		}
		if err := out.Close(); err != nil {
			return err
		}
	}
	return os.Rename(tmp, dst)
}

// natsCluster is a running JetStream cluster; see the top of this file.
type natsCluster struct {
	network string
	nodes   []*natsNode
	// caFile is the PEM bundle of the Veil CA's roots that the nodes trust for clients
	// and present their chains from. A Veil workload's identity directory has the same
	// roots in its ca.crt.
	caFile string
	// dir holds each node's certificate and configuration (dir/nats-i/...).
	dir string
}

// natsNode is one nats-server container.
type natsNode struct {
	*veilContainer
	name     string // alias, server_name and DNS SAN: nats-0, nats-1, ...
	hostPort string // client port published on 127.0.0.1, fixed across restarts
	running  bool
}

// startNATSCluster starts n JetStream nodes on network with server certificates from
// ca, and waits until the cluster has a JetStream meta leader and every node is
// healthy. Containers are removed when the test ends (their logs printed if it failed).
func startNATSCluster(t *testing.T, network string, n int, ca *pki.CA) *natsCluster {
	t.Helper()
	imageDir := natsImageContext(t)
	started := time.Now()
	c := &natsCluster{network: network, dir: t.TempDir()}
	var routes []string
	for i := range n {
		routes = append(routes, fmt.Sprintf("tls://nats-%d:6222", i))
	}
	for i := range n {
		name := fmt.Sprintf("nats-%d", i)
		nodeDir := filepath.Join(c.dir, name)
		id, err := spiffeid.FromSegments(ca.TrustDomain(), "nats", name)
		if err != nil {
			t.Fatal(err)
		}
		if err := ca.IssueFiles(id, nodeDir, time.Hour,
			pki.WithDNSNames(name, "localhost"), pki.WithIPAddresses(net.IPv6loopback, net.IPv4(127, 0, 0, 1))); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(nodeDir, "nats.conf"), []byte(natsConfig(name, routes)), 0o644); err != nil {
			t.Fatal(err)
		}
		c.caFile = filepath.Join(c.dir, "nats-0", transport.BundleFile)
		c.nodes = append(c.nodes, startNATSNode(t, imageDir, network, name, nodeDir))
	}
	c.waitReady(t, 90*time.Second)
	t.Logf("NATS cluster of %d nodes ready in %s", n, time.Since(started).Round(100*time.Millisecond))
	return c
}

// natsConfig is a node's configuration. Paths are inside the container.
func natsConfig(name string, routes []string) string {
	tlsBlock := `{
    cert_file: "/etc/nats/tls.crt"
    key_file: "/etc/nats/tls.key"
    ca_file: "/etc/nats/ca.crt"
    verify: true
    timeout: 5
  }`
	return fmt.Sprintf(`server_name: %q
listen: "0.0.0.0:4222"
http: "0.0.0.0:8222"
tls %s
jetstream {
  store_dir: "/data/jetstream"
  max_memory_store: 256MB
  max_file_store: 4GB
}
cluster {
  name: "veil"
  listen: "0.0.0.0:6222"
  # Gossiped to the other nodes for implicit routes: the alias, which the certificate
  # names (a container address would fail the route's TLS verification).
  advertise: "%s:6222"
  no_advertise: true
  connect_retries: 120
  routes: [%s]
  tls %s
}
`, name, tlsBlock, name, `"`+strings.Join(routes, `", "`)+`"`, tlsBlock)
}

func startNATSNode(t *testing.T, imageDir, network, name, nodeDir string) *natsNode {
	t.Helper()
	files := map[string]string{
		"/etc/nats/nats.conf": filepath.Join(nodeDir, "nats.conf"),
		"/etc/nats/tls.crt":   filepath.Join(nodeDir, transport.CertFile),
		"/etc/nats/tls.key":   filepath.Join(nodeDir, transport.KeyFile),
		"/etc/nats/ca.crt":    filepath.Join(nodeDir, transport.BundleFile),
	}
	var lastErr error
	// The client port is pinned so that URLs stay valid across restarts; another
	// process may take the free port first, so a few attempts.
	for range 5 {
		hostPort := freePort(t)
		req := testcontainers.ContainerRequest{
			FromDockerfile: testcontainers.FromDockerfile{
				Context:    imageDir,
				Dockerfile: "Dockerfile",
				Repo:       "veil-it-nats",
				Tag:        natsVersion,
				KeepImage:  true,
			},
			Cmd:            []string{"-c", "/etc/nats/nats.conf"},
			Networks:       []string{network},
			NetworkAliases: map[string][]string{network: {name}},
			ExposedPorts:   []string{natsClientPort, natsMonitorPort},
			HostConfigModifier: func(hc *container.HostConfig) {
				lo := netip.MustParseAddr("127.0.0.1")
				hc.PortBindings = dockernetwork.PortMap{
					dockernetwork.MustParsePort(natsClientPort):  {{HostIP: lo, HostPort: hostPort}},
					dockernetwork.MustParsePort(natsMonitorPort): {{HostIP: lo, HostPort: "0"}},
				}
			},
			WaitingFor: wait.ForAll(
				wait.ForLog("Server is ready"),
				wait.ForListeningPort(natsClientPort).SkipInternalCheck(),
			).WithDeadline(60 * time.Second),
		}
		for dst, src := range files {
			req.Files = append(req.Files, testcontainers.ContainerFile{HostFilePath: src, ContainerFilePath: dst, FileMode: 0o444})
		}
		ctr, err := testcontainers.GenericContainer(context.Background(), testcontainers.GenericContainerRequest{ContainerRequest: req, Started: true})
		if err != nil && ctr != nil && strings.Contains(err.Error(), "already") && strings.Contains(err.Error(), "port") {
			_ = ctr.Terminate(context.Background())
			lastErr = err
			continue
		}
		node := &natsNode{veilContainer: &veilContainer{Container: ctr, name: name}, name: name, hostPort: hostPort, running: err == nil}
		t.Cleanup(func() {
			if ctr == nil {
				return
			}
			if t.Failed() {
				node.dumpLogs(t)
			}
			_ = ctr.Terminate(context.Background())
		})
		if err != nil {
			t.Fatalf("starting %s: %v", name, err)
		}
		return node
	}
	t.Fatalf("starting %s: %v", name, lastErr)
	return nil
}

// url is the client URL list for containers on the cluster's network, e.g.
// "tls://nats-0:4222,tls://nats-1:4222,tls://nats-2:4222".
func (c *natsCluster) url() string {
	var urls []string
	for _, n := range c.nodes {
		urls = append(urls, "tls://"+n.name+":4222")
	}
	return strings.Join(urls, ",")
}

// hostURL is the client URL list for the test process, e.g.
// "tls://127.0.0.1:41001,tls://127.0.0.1:41002,tls://127.0.0.1:41003". The ports do
// not change when a node is restarted.
func (c *natsCluster) hostURL() string {
	var urls []string
	for i := range c.nodes {
		urls = append(urls, c.nodeHostURL(i))
	}
	return strings.Join(urls, ",")
}

// nodeHostURL is node i's client URL from the test process.
func (c *natsCluster) nodeHostURL(i int) string {
	return "tls://127.0.0.1:" + c.nodes[i].hostPort
}

// index returns the index of the node called name (a server_name such as a stream
// leader's), or -1.
func (c *natsCluster) index(name string) int {
	for i, n := range c.nodes {
		if n.name == name {
			return i
		}
	}
	return -1
}

// natsTLS is the client TLS configuration of the identity in dir (tls.crt, tls.key and
// ca.crt, as pki.CA.IssueFiles writes them): the identity's certificate as the
// client certificate and its ca.crt as the roots that verify the servers. With dir ""
// it has no client certificate and trusts caFile.
func natsTLS(t *testing.T, dir, caFile string) *tls.Config {
	t.Helper()
	if dir != "" {
		caFile = filepath.Join(dir, transport.BundleFile)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatalf("no certificates in %s", caFile)
	}
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if dir != "" {
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, transport.CertFile), filepath.Join(dir, transport.KeyFile))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg
}

// connect opens a connection from the test process to every node (hostURL) as the
// identity in dir, closed when the test ends. Reconnects are unlimited, so the
// connection rides out a node's kill and restart; opts come after the defaults.
func (c *natsCluster) connect(t *testing.T, dir string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := c.dial(t, c.hostURL(), dir, append([]nats.Option{nats.MaxReconnects(-1)}, opts...)...)
	if err != nil {
		t.Fatalf("connecting to NATS as %s: %v", dir, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// dial connects to url as the identity in dir ("" for no client certificate) and
// returns the error, for tests of refusals. The caller closes the connection.
func (c *natsCluster) dial(t *testing.T, url, dir string, opts ...nats.Option) (*nats.Conn, error) {
	t.Helper()
	base := []nats.Option{
		nats.Secure(natsTLS(t, dir, c.caFile)),
		nats.Timeout(10 * time.Second),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.Name(t.Name()),
		// Disconnects and errors are expected while nodes are killed; log them.
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				t.Logf("nats client: disconnected: %v", err)
			}
		}),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { t.Logf("nats client: %v", err) }),
	}
	return nats.Connect(url, append(base, opts...)...)
}

// kill sends SIGKILL to node i: no shutdown, no flush of its store.
func (c *natsCluster) kill(t *testing.T, i int) {
	t.Helper()
	docker, err := testcontainers.NewDockerClientWithOpts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer docker.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n := c.nodes[i]
	if _, err := docker.ContainerKill(ctx, n.GetContainerID(), client.ContainerKillOptions{Signal: "SIGKILL"}); err != nil {
		t.Fatalf("killing %s: %v", n.name, err)
	}
	for {
		st, err := n.State(ctx)
		if err != nil {
			t.Fatalf("state of %s: %v", n.name, err)
		}
		if !st.Running {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	n.running = false
}

// stop stops node i with SIGTERM, killing it after timeout.
func (c *natsCluster) stop(t *testing.T, i int, timeout time.Duration) {
	t.Helper()
	n := c.nodes[i]
	if err := n.Stop(context.Background(), &timeout); err != nil {
		t.Fatalf("stopping %s: %v", n.name, err)
	}
	n.running = false
}

// start starts node i again after stop or kill, with its store as it was, and waits
// until the whole cluster is healthy (the node has caught up).
func (c *natsCluster) start(t *testing.T, i int) {
	t.Helper()
	n := c.nodes[i]
	if err := n.Start(context.Background()); err != nil {
		t.Fatalf("starting %s again: %v", n.name, err)
	}
	n.running = true
	c.waitReady(t, 90*time.Second)
}

// startAll starts every node that is stopped or killed, for a scenario's cleanup, and
// waits until the cluster is healthy.
func (c *natsCluster) startAll(t *testing.T) {
	t.Helper()
	started := false
	for _, n := range c.nodes {
		if !n.running {
			if err := n.Start(context.Background()); err != nil {
				t.Errorf("starting %s again: %v", n.name, err)
				continue
			}
			n.running, started = true, true
		}
	}
	if started {
		c.waitReady(t, 90*time.Second)
	}
}

// healthy reports whether node i answers /healthz with 200: its routes are up, the
// JetStream meta group has a leader it follows, and its streams and consumers are
// current.
func (c *natsCluster) healthy(i int) error {
	var h struct {
		Status string `json:"status"`
	}
	return c.monitor(i, "/healthz", &h)
}

// monitor GETs path from node i's monitoring port and decodes the JSON answer into v.
func (c *natsCluster) monitor(i int, path string, v any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, err := c.nodes[i].MappedPort(ctx, natsMonitorPort)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:"+p.Port()+path, nil)
	if err != nil {
		return err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(res.Body)
		return fmt.Errorf("%s %s: %d %s", c.nodes[i].name, path, res.StatusCode, strings.TrimSpace(string(b)))
	}
	return json.NewDecoder(res.Body).Decode(v)
}

// natsVarz is the part of /varz the tests read.
type natsVarz struct {
	ServerName  string `json:"server_name"`
	TLSRequired bool   `json:"tls_required"`
	TLSVerify   bool   `json:"tls_verify"`
	Routes      int    `json:"routes"`
	Cluster     struct {
		Name        string `json:"name"`
		TLSRequired bool   `json:"tls_required"`
		TLSVerify   bool   `json:"tls_verify"`
	} `json:"cluster"`
}

// varz returns node i's /varz.
func (c *natsCluster) varz(t *testing.T, i int) natsVarz {
	t.Helper()
	var v natsVarz
	if err := c.monitor(i, "/varz", &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// metaLeader returns the server_name of the JetStream meta leader as node i sees it
// ("" while there is none).
func (c *natsCluster) metaLeader(i int) (string, error) {
	var jsz struct {
		Meta struct {
			Leader string `json:"leader"`
		} `json:"meta_cluster"`
	}
	err := c.monitor(i, "/jsz", &jsz)
	return jsz.Meta.Leader, err
}

// waitReady waits until every running node is healthy and they agree on a JetStream
// meta leader.
func (c *natsCluster) waitReady(t *testing.T, limit time.Duration) {
	t.Helper()
	poll(t, "NATS cluster ready", limit, func() error {
		var errs []error
		for i, n := range c.nodes {
			if n.running {
				if err := c.healthy(i); err != nil {
					errs = append(errs, err)
				}
			}
		}
		if len(errs) > 0 {
			return errors.Join(errs...)
		}
		leader := ""
		for i, n := range c.nodes {
			if !n.running {
				continue
			}
			l, err := c.metaLeader(i)
			if err != nil {
				return err
			}
			if l == "" || (leader != "" && l != leader) {
				return fmt.Errorf("no agreed meta leader (%s says %q, another %q)", n.name, l, leader)
			}
			leader = l
		}
		return nil
	})
}

// TestNATSCluster starts a 3-node JetStream cluster with TLS from the Veil CA, connects
// with a Veil client certificate, creates R=3 KV and Object Store buckets, writes,
// kills the KV stream's leader, writes and reads again on the remaining quorum,
// restarts the node and checks it caught up, and checks that clients without a
// certificate, with a certificate from another CA, or without TLS are refused.
func TestNATSCluster(t *testing.T) {
	dir, ca := identities(t, "spiffe://example.org/client")
	cluster := startNATSCluster(t, newNetwork(t), 3, ca)
	client := filepath.Join(dir, "client")
	nc := cluster.connect(t, client)
	if !nc.TLSRequired() {
		t.Fatal("connection without TLS")
	}
	if cs, err := nc.TLSConnectionState(); err != nil || !cs.HandshakeComplete {
		t.Fatalf("TLS state %v, %v", cs, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "smoke", Replicas: 3, Storage: jetstream.FileStorage, History: 5})
	if err != nil {
		t.Fatal(err)
	}
	obs, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: "blobs", Replicas: 3, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	blob := func(seed byte, n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = seed + byte(i*131>>7)
		}
		return b
	}
	// retry repeats f while a leader is being elected (a few seconds), each attempt
	// with its own deadline: a call started during an election may wait for it
	// instead of failing fast.
	retry := func(what string, f func(ctx context.Context) error) {
		t.Helper()
		poll(t, what, 90*time.Second, func() error {
			ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			defer cancel()
			err := f(ctx)
			if err != nil {
				t.Logf("%s: %v", what, err)
			}
			return err
		})
	}
	if _, err := kv.Put(ctx, "before", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	if _, err := obs.PutBytes(ctx, "before", blob(1, 3<<20)); err != nil {
		t.Fatal(err)
	}
	info, err := js.Stream(ctx, "KV_smoke")
	if err != nil {
		t.Fatal(err)
	}
	si, err := info.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if si.Config.Replicas != 3 || si.Cluster == nil || len(si.Cluster.Replicas) != 2 {
		t.Fatalf("KV stream: %d replicas, cluster %+v", si.Config.Replicas, si.Cluster)
	}
	// The victim is the JetStream meta leader (the hardest node to lose: every
	// stream and consumer creation waits for a new one).
	meta, err := cluster.metaLeader(0)
	if err != nil {
		t.Fatal(err)
	}
	victim := cluster.index(meta)
	if victim < 0 {
		t.Fatalf("meta leader %q is not a node", meta)
	}
	t.Logf("meta leader %s, KV stream leader %s: killing %s", meta, si.Cluster.Leader, meta)

	cluster.kill(t, victim)
	killed := time.Now()
	retry("KV put with a node killed", func(ctx context.Context) error { _, err := kv.Put(ctx, "during", []byte("v2")); return err })
	t.Logf("KV write accepted %s after the kill", time.Since(killed).Round(time.Millisecond))
	retry("object put with a node killed", func(ctx context.Context) error {
		_, err := obs.PutBytes(ctx, "during", blob(2, 3<<20))
		return err
	})
	check := func(ctx context.Context, kv jetstream.KeyValue, obs jetstream.ObjectStore) error {
		for k, want := range map[string]string{"before": "v1", "during": "v2"} {
			e, err := kv.Get(ctx, k)
			if err != nil {
				return fmt.Errorf("get %s: %w", k, err)
			}
			if string(e.Value()) != want {
				return fmt.Errorf("%s = %q, want %q", k, e.Value(), want)
			}
		}
		for name, seed := range map[string]byte{"before": 1, "during": 2} {
			b, err := obs.GetBytes(ctx, name)
			if err != nil {
				return fmt.Errorf("object %s: %w", name, err)
			}
			if !bytes.Equal(b, blob(seed, 3<<20)) {
				return fmt.Errorf("object %s: %d bytes differ", name, len(b))
			}
		}
		return nil
	}
	retry("reads with a node killed", func(ctx context.Context) error { return check(ctx, kv, obs) })

	restarted := time.Now()
	cluster.start(t, victim)
	t.Logf("%s restarted and the cluster healthy in %s", cluster.nodes[victim].name, time.Since(restarted).Round(time.Millisecond))
	// The restarted node's replica caught up: every peer current, none lagging.
	retry("replicas current after the restart", func(ctx context.Context) error {
		si, err := info.Info(ctx)
		if err != nil {
			return err
		}
		if si.Cluster.Leader == "" {
			return errors.New("no leader")
		}
		for _, p := range si.Cluster.Replicas {
			if !p.Current || p.Offline || p.Lag != 0 {
				return fmt.Errorf("replica %+v", *p)
			}
		}
		return nil
	})
	// A client connected only to the restarted node reads everything.
	only, err := cluster.dial(t, cluster.nodeHostURL(victim), client, nats.NoReconnect())
	if err != nil {
		t.Fatal(err)
	}
	defer only.Close()
	js2, err := jetstream.New(only)
	if err != nil {
		t.Fatal(err)
	}
	kv2, err := js2.KeyValue(ctx, "smoke")
	if err != nil {
		t.Fatal(err)
	}
	obs2, err := js2.ObjectStore(ctx, "blobs")
	if err != nil {
		t.Fatal(err)
	}
	retry("reads through the restarted node", func(ctx context.Context) error { return check(ctx, kv2, obs2) })
	if _, err := kv2.Put(ctx, "after", []byte("v3")); err != nil {
		t.Fatal(err)
	}

	refused := func(t *testing.T, url string, opts ...nats.Option) {
		t.Helper()
		nc, err := nats.Connect(url, append([]nats.Option{nats.Timeout(10 * time.Second), nats.NoReconnect()}, opts...)...)
		if err == nil {
			// TLS 1.3 reports a refused client certificate after the handshake: the
			// server closes the connection before it can be used.
			err = nc.Flush()
			nc.Close()
		}
		if err == nil {
			t.Fatal("connected and flushed")
		}
		t.Logf("refused: %v", err)
	}
	t.Run("no client certificate", func(t *testing.T) {
		refused(t, cluster.nodeHostURL(0), nats.Secure(natsTLS(t, "", cluster.caFile)))
	})
	t.Run("certificate from another CA", func(t *testing.T) {
		foreignDir, _ := identities(t, "spiffe://example.org/client")
		cfg := natsTLS(t, filepath.Join(foreignDir, "client"), "")
		cfg.RootCAs = natsTLS(t, "", cluster.caFile).RootCAs // trusts the real servers
		refused(t, cluster.nodeHostURL(1), nats.Secure(cfg))
	})
	t.Run("no TLS", func(t *testing.T) {
		// A plaintext client: the server's INFO demands TLS, and a CONNECT and PING
		// sent in the clear get no PONG; the server drops the connection.
		conn, err := net.DialTimeout("tcp", strings.TrimPrefix(cluster.nodeHostURL(2), "tls://"), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		r := bufio.NewReader(conn)
		info, err := r.ReadString('\n')
		if err != nil || !strings.HasPrefix(info, "INFO ") || !strings.Contains(info, `"tls_required":true`) {
			t.Fatalf("INFO %q, %v", info, err)
		}
		if _, err := conn.Write([]byte("CONNECT {\"verbose\":false}\r\nPING\r\n")); err != nil {
			t.Fatal(err)
		}
		rest, err := io.ReadAll(r)
		if strings.Contains(string(rest), "PONG") {
			t.Fatalf("a plaintext client got %q", rest)
		}
		t.Logf("plaintext client: %q, %v", rest, err)
	})
	t.Run("routes over TLS", func(t *testing.T) {
		for i, n := range cluster.nodes {
			v := cluster.varz(t, i)
			if !v.Cluster.TLSRequired || !v.Cluster.TLSVerify || !v.TLSRequired || !v.TLSVerify || v.Routes < len(cluster.nodes)-1 {
				t.Fatalf("%s: varz %+v", n.name, v)
			}
			// Implicit routes (to a restarted node, learnt by gossip) verify too:
			// the nodes advertise their aliases, which their certificates name.
			rc, err := n.Logs(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(rc)
			rc.Close()
			if i := bytes.Index(b, []byte("TLS route handshake error")); i >= 0 {
				t.Fatalf("%s: %s", n.name, b[i:i+bytes.IndexByte(b[i:], '\n')])
			}
		}
	})
}
