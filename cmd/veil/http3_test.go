package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
)

// TestCallOverHTTP3: veil serve --http3 answers veil call over HTTP/3 (sealed end to
// end, post-quantum TLS in the QUIC handshake) and over HTTP/2, and -v says which.
func TestCallOverHTTP3(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	for _, args := range [][]string{
		{"ca", "init", "--dir", filepath.Join(dir, "ca"), "--trust-domain", "example.org"},
		{"ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/echo", "--out", filepath.Join(dir, "echo")},
		{"ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/client", "--out", filepath.Join(dir, "client")},
	} {
		if code, _, errOut := veil(t, ctx, args...); code != 0 {
			t.Fatalf("veil %v: %s", args, errOut)
		}
	}
	base := "https://127.0.0.1:" + startServe(t, "--identity", filepath.Join(dir, "echo"), "--service", "echo", "--http3")
	for _, c := range []struct {
		flags []string
		proto string
	}{
		{[]string{"--http3"}, "protocol: h3"},
		{[]string{"--http3=auto"}, "protocol: h3"},
		{[]string{"--http3=off"}, "protocol: h2"},
		{nil, "protocol: h2"},
	} {
		args := append(append([]string{"call", "--identity", filepath.Join(dir, "client"), "--addr", base, "--server-id", "spiffe://example.org/echo", "-v"}, c.flags...),
			"/veil.echo.v1.EchoService/Echo", `{"message":"sealed hello"}`)
		code, out, errOut := veil(t, ctx, args...)
		if code != 0 || !strings.Contains(out, `"sealed hello"`) || !strings.Contains(errOut, c.proto) ||
			!strings.Contains(errOut, "TLS 1.3 X25519MLKEM768") || !strings.Contains(errOut, "pq-seal: on") {
			t.Fatalf("veil call %v: exit %d out %q err %q", c.flags, code, out, errOut)
		}
	}
	if code, _, errOut := veil(t, ctx, "call", "--identity", filepath.Join(dir, "client"), "--addr", base, "--http3=maybe",
		"/veil.echo.v1.EchoService/Echo", `{"message":"x"}`); code != 2 || !strings.Contains(errOut, "want on, off or auto") {
		t.Fatalf("--http3=maybe: exit %d err %q", code, errOut)
	}
}
