package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"os"
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

// startCAServe runs `veil ca serve` until the test ends and returns its address.
func startCAServe(t *testing.T, dir string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var errOut bytes.Buffer
	go func() {
		done <- run(ctx, []string{"ca", "serve", "--dir", dir, "--listen", addr, "--rate", "10", "--burst", "10"}, io.Discard, &errOut)
	}()
	t.Cleanup(func() {
		stop()
		if code := <-done; code != 0 {
			t.Errorf("ca serve exit %d: %s", code, errOut.String())
		}
	})
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
	}
	return addr
}

func token(t *testing.T, dir, id string, ttl time.Duration) string {
	t.Helper()
	code, out, errOut := veil(t, context.Background(), "ca", "token", "--dir", dir, "--id", id, "--ttl", ttl.String(), "--json")
	if code != 0 {
		t.Fatalf("ca token: %d %s", code, errOut)
	}
	var res struct{ Token string }
	if err := json.Unmarshal([]byte(out), &res); err != nil || !strings.HasPrefix(res.Token, "vjt1.") {
		t.Fatalf("ca token --json: %v %s", err, out)
	}
	return res.Token
}

// serverSerial handshakes with the server on a new connection and returns its leaf's serial.
func serverSerial(t *testing.T, addr string, client transport.Source) string {
	t.Helper()
	cfg := transport.ClientConfig(client, transport.WithAuthorizer(transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/echo"))))
	cfg.ClientSessionCache = nil
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.Text(16)
}

// TestOnlineCA joins `veil serve` to `veil ca serve` with a token, watches it renew a
// 10 s certificate while serving, and checks the refusals of used and expired tokens.
func TestOnlineCA(t *testing.T) {
	ctx := context.Background()
	tmp, dir, caAddr := onlineCA(t)
	tok := token(t, dir, "spiffe://example.org/echo", 10*time.Minute)
	joinArgs := func(tok string) []string {
		return []string{"--ca", "https://" + caAddr, "--ca-bundle", filepath.Join(dir, "bundle.crt"), "--join-token", tok,
			"--id", "spiffe://example.org/echo", "--cert-ttl", "10s", "--renew-before", "6s", "--service", "echo"}
	}
	port := startServe(t, joinArgs(tok)...)
	addr := "127.0.0.1:" + port

	client, err := transport.LoadFiles(filepath.Join(tmp, "client"))
	if err != nil {
		t.Fatal(err)
	}
	hc := rpc.NewHTTPClient(client, transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/echo")))
	echo := echov1connect.NewEchoServiceClient(hc, "https://"+addr, rpc.ClientOptions()...)
	first := serverSerial(t, addr, client)
	// The certificate is renewed 4 s after issue; calls keep working throughout.
	var calls int
	deadline := time.Now().Add(20 * time.Second)
	for serverSerial(t, addr, client) == first {
		if time.Now().After(deadline) {
			t.Fatal("veil serve did not renew its certificate")
		}
		calls++
		if _, err := echo.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "hi"})); err != nil {
			t.Fatalf("call %d: %v", calls, err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// A used token, and an expired one, make veil serve exit 1 saying so.
	code, _, errOut := veil(t, ctx, append([]string{"serve", "--listen", "127.0.0.1:0"}, joinArgs(tok)...)...)
	if code != 1 || !strings.Contains(errOut, "already used") {
		t.Fatalf("reused token: exit %d %q", code, errOut)
	}
	expired := token(t, dir, "spiffe://example.org/echo", time.Millisecond)
	time.Sleep(10 * time.Millisecond)
	code, _, errOut = veil(t, ctx, append([]string{"serve", "--listen", "127.0.0.1:0"}, joinArgs(expired)...)...)
	if code != 1 || !strings.Contains(errOut, "expired") {
		t.Fatalf("expired token: exit %d %q", code, errOut)
	}
}

func TestCARotateAndRevokeCLI(t *testing.T) {
	ctx := context.Background()
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "ca")
	if code, _, errOut := veil(t, ctx, "ca", "init", "--dir", dir, "--trust-domain", "example.org"); code != 0 {
		t.Fatal(errOut)
	}
	if code, _, errOut := veil(t, ctx, "ca", "issue", "--dir", dir, "--id", "spiffe://example.org/w", "--out", filepath.Join(tmp, "w")); code != 0 {
		t.Fatal(errOut)
	}
	if code, out, errOut := veil(t, ctx, "ca", "intermediate", "--dir", dir, "--ttl", "720h", "--json"); code != 0 || !strings.Contains(out, "intermediate.crt") {
		t.Fatalf("ca intermediate: %d %s %s", code, out, errOut)
	}
	phase := func(step string, args ...string) (int, string) {
		t.Helper()
		code, out, errOut := veil(t, ctx, append([]string{"ca", "rotate", "--dir", dir, "--step", step, "--json"}, args...)...)
		if code != 0 {
			return code, errOut
		}
		var res struct{ Phase string }
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		return code, res.Phase
	}
	for _, step := range []struct{ step, want string }{{"status", "none"}, {"prepare", "prepared"}, {"activate", "activated"}} {
		if code, got := phase(step.step); code != 0 || got != step.want {
			t.Fatalf("%s: exit %d phase %q", step.step, code, got)
		}
	}
	// The leaf issued above (24 h) still needs the old root.
	if code, msg := phase("finish"); code != 1 || !strings.Contains(msg, "valid until") {
		t.Fatalf("early finish: exit %d %q", code, msg)
	}
	if code, got := phase("finish", "--force"); code != 0 || got != "none" {
		t.Fatalf("forced finish: exit %d %q", code, got)
	}
	code, out, _ := veil(t, ctx, "ca", "revoke", "--dir", dir, "--serial", "0A1B", "--id", "spiffe://example.org/w", "--json")
	if code != 0 || !strings.Contains(out, `"a1b"`) || !strings.Contains(out, "spiffe://example.org/w") {
		t.Fatalf("revoke: %d %s", code, out)
	}
	for _, args := range [][]string{
		{"ca", "revoke", "--dir", dir},
		{"ca", "revoke", "--dir", dir, "--serial", "xyz"},
		{"ca", "rotate", "--dir", dir, "--step", "sideways"},
		{"ca", "token", "--dir", dir},
		{"ca", "token", "--dir", dir, "--id", "not-spiffe"},
		{"ca", "serve"},
		{"serve", "--identity", tmp, "--ca", "https://127.0.0.1:1", "--service", "echo"},
		{"serve", "--ca", "https://127.0.0.1:1", "--service", "echo"},
		{"serve", "--ca", "https://127.0.0.1:1", "--ca-bundle", "x", "--join-token", "t", "--id", "spiffe://example.org/e", "--cert-ttl", "5s", "--service", "echo"},
	} {
		if code, _, errOut := veil(t, ctx, args...); code != 2 || errOut == "" {
			t.Errorf("veil %v: exit %d %q, want 2", args, code, errOut)
		}
	}
	for _, sub := range []string{"serve", "token", "rotate", "revoke", "intermediate"} {
		if code, _, _ := veil(t, ctx, "ca", sub, "--help"); code != 0 {
			t.Errorf("ca %s --help: exit %d", sub, code)
		}
	}
}

func TestExpiryStatusOfFiles(t *testing.T) {
	ca, err := pki.InitCA(filepath.Join(t.TempDir(), "ca"), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	id := spiffeid.RequireFromString("spiffe://example.org/w")
	// ca.Issue back-dates NotBefore by a minute: a 10 s certificate has 70 s of
	// lifetime, a sixth of which (11.7 s) is more than it has left.
	if err := ca.IssueFiles(id, dir, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	src, err := transport.LoadFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st := (expiryStatus{src: src}).Status(); st.Healthy || st.ID != id || st.Remaining > 10*time.Second {
		t.Fatalf("short-lived file identity: %+v", st)
	}
	if err := ca.IssueFiles(id, dir, time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := src.Reload(); err != nil {
		t.Fatal(err)
	}
	if st := (expiryStatus{src: src, file: src}).Status(); !st.Healthy {
		t.Fatalf("fresh file identity: %+v", st)
	}
}

// `veil ca init --if-missing` is safe to run on every start (an init container);
// `veil ca bundle` prints what workloads pass as --ca-bundle.
func TestCAInitIfMissingAndBundle(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ctx := context.Background()
	if code, _, errOut := veil(t, ctx, "ca", "init", "--dir", dir, "--trust-domain", "example.org", "--if-missing", "--json"); code != 0 {
		t.Fatalf("first init: %s", errOut)
	}
	root, err := os.ReadFile(filepath.Join(dir, "root.crt"))
	if err != nil {
		t.Fatal(err)
	}
	code, out, errOut := veil(t, ctx, "ca", "init", "--dir", dir, "--trust-domain", "example.org", "--if-missing", "--json")
	if code != 0 || !strings.Contains(out, `"created": false`) {
		t.Fatalf("second init with --if-missing: exit %d %s %s", code, out, errOut)
	}
	if again, _ := os.ReadFile(filepath.Join(dir, "root.crt")); string(again) != string(root) {
		t.Fatal("--if-missing replaced the root")
	}
	if code, _, _ := veil(t, ctx, "ca", "init", "--dir", dir, "--trust-domain", "example.org"); code == 0 {
		t.Fatal("a second init without --if-missing succeeded")
	}
	if code, _, errOut := veil(t, ctx, "ca", "init", "--dir", dir, "--trust-domain", "other.org", "--if-missing"); code != 1 || !strings.Contains(errOut, "example.org") {
		t.Fatalf("another trust domain: exit %d %s", code, errOut)
	}
	code, out, errOut = veil(t, ctx, "ca", "bundle", "--dir", dir)
	if code != 0 || out != string(root) {
		t.Fatalf("bundle: exit %d %q (want the root PEM) %s", code, out, errOut)
	}
}

// A server that joins the online CA seals end to end with the sealing identity the CA
// issues with each certificate (no files), and keeps sealing across renewals, which
// rotate that identity too.
func TestOnlineCASealing(t *testing.T) {
	ctx := context.Background()
	tmp, dir, caAddr := onlineCA(t)
	port := startServe(t, "--ca", "https://"+caAddr, "--ca-bundle", filepath.Join(dir, "bundle.crt"),
		"--join-token", token(t, dir, "spiffe://example.org/echo", 10*time.Minute), "--id", "spiffe://example.org/echo",
		"--cert-ttl", "10s", "--renew-before", "6s", "--service", "echo", "--pq-seal", "strict")
	addr := "127.0.0.1:" + port
	client, err := transport.LoadFiles(filepath.Join(tmp, "client"))
	if err != nil {
		t.Fatal(err)
	}
	call := func() (int, string) {
		code, out, errOut := veil(t, ctx, "call", "-v", "--identity", filepath.Join(tmp, "client"), "--addr", "https://"+addr,
			"/veil.echo.v1.EchoService/Echo", `{"message":"sealed"}`)
		return code, out + errOut
	}
	first := serverSerial(t, addr, client)
	calls := 0
	for deadline := time.Now().Add(25 * time.Second); serverSerial(t, addr, client) == first || calls < 2; calls++ {
		if time.Now().After(deadline) {
			t.Fatal("veil serve did not renew its certificate")
		}
		code, out := call()
		if code != 0 || !strings.Contains(out, "sealed") || !strings.Contains(out, "X25519MLKEM768") {
			t.Fatalf("sealed call %d: exit %d %s", calls, code, out)
		}
		time.Sleep(300 * time.Millisecond)
	}
	// Once more after the renewal: a new client fetches the new sealing credential.
	if code, out := call(); code != 0 {
		t.Fatalf("sealed call after the renewal: exit %d %s", code, out)
	}
	// Strict: an unsealed call is refused.
	code, out, errOut := veil(t, ctx, "call", "--pq-seal", "off", "--identity", filepath.Join(tmp, "client"), "--addr", "https://"+addr,
		"/veil.echo.v1.EchoService/Echo", `{"message":"plain"}`)
	if code == 0 {
		t.Fatalf("an unsealed call to a strict server succeeded: %s", out+errOut)
	}
}

// onlineCA makes a CA for example.org in tmp/ca, issues spiffe://example.org/client into
// tmp/client and serves the CA online.
func onlineCA(t *testing.T) (tmp, dir, caAddr string) {
	t.Helper()
	ctx := context.Background()
	tmp = t.TempDir()
	dir = filepath.Join(tmp, "ca")
	if code, _, errOut := veil(t, ctx, "ca", "init", "--dir", dir, "--trust-domain", "example.org"); code != 0 {
		t.Fatal(errOut)
	}
	if code, _, errOut := veil(t, ctx, "ca", "issue", "--dir", dir, "--id", "spiffe://example.org/client", "--out", filepath.Join(tmp, "client")); code != 0 {
		t.Fatal(errOut)
	}
	return tmp, dir, startCAServe(t, dir)
}
