package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/pki"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// sealedIdentities issues X.509 and sealing identities for ids.
func sealedIdentities(t *testing.T, ids ...string) string {
	t.Helper()
	return sealedIdentitiesOf(t, nil, ids...)
}

// sealedIdentitiesOf issues X.509 and sealing identities of suite (nil: the default) for
// ids; for the ShangMi suite the CA first gets its SM2 key (veil ca init --sm2).
func sealedIdentitiesOf(t *testing.T, suite pqkex.Scheme, ids ...string) string {
	t.Helper()
	dir, ca := identities(t, ids...)
	if suite == pqkex.SM2MLKEM768() {
		if err := pki.AddSM2Key(filepath.Join(dir, "ca")); err != nil {
			t.Fatal(err)
		}
		var err error
		if ca, err = pki.LoadCA(filepath.Join(dir, "ca")); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range ids {
		name := id[strings.LastIndex(id, "/")+1:]
		if err := rpc.IssueSealingIdentity(ca, spiffeid.RequireFromString(id), filepath.Join(dir, name), time.Hour, suite); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func sealedFiles(dir, name string, extra map[string]string) map[string]string {
	files := identityFiles(dir, name)
	for _, f := range []string{rpc.SealCredentialFile, rpc.SealKeyFile, rpc.SealRootFile, rpc.SealSM2RootFile} {
		if _, err := os.Stat(filepath.Join(dir, name, f)); err == nil {
			files["/identity/"+f] = filepath.Join(dir, name, f)
		}
	}
	for k, v := range extra {
		files[k] = v
	}
	return files
}

// proxyLog is what the test proxy printed: request lines and the bodies it forwarded.
type proxyLog struct {
	requests []string
	bodies   []byte
	marked   map[string]bool // the markers logged (logOf)
	restarts int             // how many times the proxy dropped its connections and served again
}

// logOf reads the log of the proxy c, served at base, up to a marker it asks that proxy
// to log now: the Docker engine delivers a container's output to its log asynchronously
// (later still on a busy machine), so a plain read can miss the last requests.
func (s *sealedTopology) logOf(t *testing.T, c *veilContainer, base string) proxyLog {
	t.Helper()
	id := fmt.Sprint(proxyMarks.Add(1))
	s.postTo(t, base, "/_testproxy/mark?id="+id)
	mark := "MARK " + strconv.Quote(id) // as the proxy logs it
	var pl proxyLog
	poll(t, "the proxy's log marker "+mark, time.Minute, func() error {
		if pl = readProxyLog(t, c); !pl.marked[mark] {
			return fmt.Errorf("not in the log yet")
		}
		return nil
	})
	return pl
}

func readProxyLog(t *testing.T, c *veilContainer) proxyLog {
	t.Helper()
	rc, err := c.Logs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var pl proxyLog
	sc := bufio.NewScanner(rc)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		// Docker multiplexes stdout with 8-byte frame headers; find the payload.
		if i := strings.Index(line, "BODY "); i >= 0 {
			f := strings.Fields(line[i:])
			if len(f) == 3 {
				b, err := base64.StdEncoding.DecodeString(f[2])
				if err != nil {
					t.Fatalf("proxy log: %v", err)
				}
				pl.bodies = append(pl.bodies, b...)
			}
		} else if i := strings.Index(line, "REQUEST "); i >= 0 {
			pl.requests = append(pl.requests, line[i:])
		} else if strings.Contains(line, "testproxy restarted") {
			pl.restarts++
		} else if i := strings.Index(line, "MARK "); i >= 0 {
			if pl.marked == nil {
				pl.marked = map[string]bool{}
			}
			pl.marked[strings.TrimSpace(line[i:])] = true
		}
	}
	return pl
}

type sealedTopology struct {
	suite   pqkex.Scheme // of every identity; the replicas and clients require it
	dir     string
	proxy   *veilContainer
	url     string
	control *http.Client
	// stripper is a second proxy in front of the same replicas that strips the
	// sealing headers.
	stripper    *veilContainer
	stripperURL string
}

// startSealedTopology runs three echo replicas sealing STRICT behind two
// TLS-terminating test proxies, one of them stripping the sealing headers. Replicas 0
// and 1 share a ticket key; replica 2 has its own.
func startSealedTopology(t *testing.T, suite pqkex.Scheme) *sealedTopology {
	t.Helper()
	dir := sealedIdentitiesOf(t, suite, "spiffe://example.org/echo", "spiffe://example.org/proxy", "spiffe://example.org/client")
	shared, other := filepath.Join(dir, "tickets-shared"), filepath.Join(dir, "tickets-other")
	for _, f := range []string{shared, other} {
		if _, err := rpc.RotateTicketKeyFile(f); err != nil {
			t.Fatal(err)
		}
	}
	nw := newNetwork(t)
	var upstreams []string
	for i, tickets := range []string{shared, shared, other} {
		alias := fmt.Sprintf("echo-%d", i)
		startVeil(t, containerSpec{
			alias: alias, network: nw, port: "8443/tcp",
			args: []string{"/veil", "serve", "--identity", "/identity", "--listen", ":8443", "--service", "echo",
				"--pq", "strict", "--pq-seal", "strict", "--pq-suite", suite.Name(), "--ticket-keys", "/identity/tickets", "--allow", "spiffe://example.org/client"},
			files: sealedFiles(dir, "echo", map[string]string{"/identity/tickets": tickets}),
		})
		upstreams = append(upstreams, "--upstream", "https://"+alias+":8443")
	}
	args := append([]string{"/testproxy", "--identity", "/identity", "--listen", ":8443"}, upstreams...)
	proxy := startVeil(t, containerSpec{
		alias: "proxy", network: nw, port: "8443/tcp", ready: "testproxy serving",
		args: args, files: identityFiles(dir, "proxy"),
	})
	stripper := startVeil(t, containerSpec{
		alias: "stripping-proxy", network: nw, port: "8443/tcp", ready: "testproxy serving",
		args: append(args, "--strip"), files: identityFiles(dir, "proxy"),
	})
	client := loadSource(t, filepath.Join(dir, "client"))
	return &sealedTopology{
		suite: suite, dir: dir, proxy: proxy, url: "https://" + proxy.endpoint(t, "8443/tcp"),
		control:  rpc.NewHTTPClient(client, transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/proxy"))),
		stripper: stripper, stripperURL: "https://" + stripper.endpoint(t, "8443/tcp"),
	}
}

// client returns an echo client sealed end to end with the echo service, whose TLS
// peer is the proxy.
func (s *sealedTopology) client(t *testing.T, url string) echov1connect.EchoServiceClient {
	t.Helper()
	id, roots, err := rpc.LoadSealingIdentity(filepath.Join(s.dir, "client"))
	if err != nil {
		t.Fatal(err)
	}
	// Through the terminating proxy: no channel binding, and the sealed calls expect the
	// echo service end to end, not the TLS peer.
	echo := pqkex.AuthorizeID("spiffe://example.org/echo")
	pc, err := pqkex.NewClient(pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.WithAuthorizer(echo), pqkex.WithoutChannelBinding(),
		pqkex.RequireSuites(s.suite))
	if err != nil {
		t.Fatal(err)
	}
	hc := rpc.NewHTTPClient(loadSource(t, filepath.Join(s.dir, "client")),
		transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/proxy")), rpc.WithClientSealing(pc), rpc.WithSealedServer(echo))
	return echov1connect.NewEchoServiceClient(hc, url, rpc.ClientOptions()...)
}

func (s *sealedTopology) route(t *testing.T, n int) {
	t.Helper()
	s.post(t, fmt.Sprintf("/_testproxy/route?to=%d", n))
}

// post sends a control request to the test proxy.
func (s *sealedTopology) post(t *testing.T, path string) {
	t.Helper()
	s.postTo(t, s.url, path)
}

// postTo sends a control request to the test proxy at base.
func (s *sealedTopology) postTo(t *testing.T, base, path string) {
	t.Helper()
	res, err := s.control.Post(base+path, "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("%s: %d %s", path, res.StatusCode, b)
	}
}

// TestSealingThroughProxies runs the scenarios that need replicas behind proxies on
// one topology (starting it costs most of the time).
func TestSealingThroughProxies(t *testing.T) {
	s := startSealedTopology(t, pqkex.X25519MLKEM768())
	// Order matters: the resumption scenario moves the proxy's route.
	t.Run("sealed end to end through a logging proxy", s.testSealedThroughProxy)
	t.Run("a stripping proxy is refused", s.testStrippingProxyIsRefused)
	t.Run("stateless resumption across replicas", s.testStatelessResumption)
}

// TestShangMiSealingThroughProxies runs the same scenarios with ShangMi-only replicas
// (veil serve --pq-suite SM2MLKEM768-SM3, identities from a CA with an SM2 key): only
// ciphertext in the logging proxy's log, refusal of a stripping proxy, tickets that resume
// across the replicas sharing a ticket key.
func TestShangMiSealingThroughProxies(t *testing.T) {
	s := startSealedTopology(t, pqkex.SM2MLKEM768())
	t.Run("sealed end to end through a logging proxy", s.testSealedThroughProxy)
	t.Run("a stripping proxy is refused", s.testStrippingProxyIsRefused)
	t.Run("stateless resumption across replicas", s.testStatelessResumption)
}

// testSealedThroughProxy: calls succeed through a TLS-terminating proxy that logs what
// it forwards, and nothing it logged contains the plaintext.
func (s *sealedTopology) testSealedThroughProxy(t *testing.T) {
	c := s.client(t, s.url)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	secrets := []string{"feature 17.99 10.38 122.8 1001", "score 0.93127"}
	for _, msg := range secrets {
		res, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: msg}))
		if err != nil || res.Msg.GetMessage() != msg {
			t.Fatalf("Echo through the proxy = %v, %v", res, err)
		}
	}
	stream, err := c.EchoStream(ctx, connect.NewRequest(&echov1.EchoStreamRequest{Message: secrets[1], Count: 20}))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for stream.Receive() {
		n++
	}
	if stream.Err() != nil || n != 20 {
		t.Fatalf("stream through the proxy: %d, %v", n, stream.Err())
	}
	pl := s.logOf(t, s.proxy, s.url)
	if len(pl.bodies) == 0 || len(pl.requests) == 0 {
		t.Fatalf("the proxy logged %d requests and %d body bytes", len(pl.requests), len(pl.bodies))
	}
	for _, msg := range secrets {
		for _, word := range strings.Fields(msg) {
			if bytes.Contains(pl.bodies, []byte(word)) {
				t.Fatalf("the proxy saw plaintext %q", word)
			}
		}
	}
}

// testStrippingProxyIsRefused: a proxy that strips the sealing headers gets an error
// from the STRICT service, never a plaintext answer.
func (s *sealedTopology) testStrippingProxyIsRefused(t *testing.T) {
	c := s.client(t, s.stripperURL)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "must not come back in the clear"}))
	if err == nil {
		t.Fatal("a call through a stripping proxy succeeded")
	}
	if bytes.Contains(s.logOf(t, s.stripper, s.stripperURL).bodies, []byte("in the clear")) {
		t.Fatal("plaintext crossed the proxy")
	}
}

// testStatelessResumption: a session established with replica 0 continues on replica
// 1 (same ticket key) without a new handshake; replica 2 (another ticket key) refuses
// the ticket and the client handshakes again.
func (s *sealedTopology) testStatelessResumption(t *testing.T) {
	c := s.client(t, s.url)
	before := len(s.logOf(t, s.proxy, s.url).requests)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	echo := func(msg string) error {
		res, err := c.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: msg}))
		if err == nil && res.Msg.GetMessage() != msg {
			err = fmt.Errorf("echoed %q", res.Msg.GetMessage())
		}
		return err
	}
	if err := echo("on replica 0"); err != nil {
		t.Fatal(err)
	}
	s.route(t, 1)
	for i := range 3 {
		if err := echo(fmt.Sprint("on replica 1, call ", i)); err != nil {
			t.Fatalf("resumed call on replica 1: %v", err)
		}
	}
	handshakes := func(upstream int) int {
		n := 0
		for _, r := range s.logOf(t, s.proxy, s.url).requests[before:] {
			if strings.Contains(r, fmt.Sprintf("upstream=%d ", upstream)) && strings.Contains(r, pqkex.HandshakePath) {
				n++
			}
		}
		return n
	}
	if h0, h1 := handshakes(0), handshakes(1); h0 != 1 || h1 != 0 {
		t.Fatalf("handshakes: replica 0 %d, replica 1 %d; want 1 and 0", h0, h1)
	}
	s.route(t, 2)
	// Replica 2 does not hold the session (the call comes in the short form, spec 6.6)
	// and refuses it; the client resends it with the ticket, which replica 2 cannot open
	// either (another ticket key); the client then handshakes again, with replica 2, and
	// resends it a last time: transparently to the caller.
	if err := echo("on replica 2"); err != nil {
		t.Fatalf("after the ticket was refused: %v", err)
	}
	refused := 0
	for _, r := range s.logOf(t, s.proxy, s.url).requests[before:] {
		if strings.Contains(r, "upstream=2 ") && strings.Contains(r, "EchoService/Echo") {
			refused++
		}
	}
	if refused != 3 {
		t.Fatalf("replica 2 saw %d echo calls, want 3: short form refused, ticket refused, resent on a new session", refused)
	}
	if h2 := handshakes(2); h2 != 1 {
		t.Fatalf("handshakes on replica 2: %d, want 1", h2)
	}
}
