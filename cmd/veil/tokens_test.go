package main

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/pem"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/golang-jwt/jwt/v5"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/auth"
)

// TestServeRequireToken runs a token service (veil serve --service auth) and an echo
// server with --require-token, and attacks the echo server with each kind of bad
// token: every one is refused as unauthenticated with its own reason, counted in
// veil_rpc_auth_refusals_total; veil call with --token-from gets through.
func TestServeRequireToken(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	caDir := filepath.Join(dir, "ca")
	mustVeil(t, "ca", "init", "--dir", caDir, "--trust-domain", "example.org")
	for _, name := range []string{"auth", "echo", "client", "thief"} {
		mustVeil(t, "ca", "issue", "--dir", caDir, "--id", "spiffe://example.org/"+name, "--out", filepath.Join(dir, name))
	}
	const echoID, authID = "spiffe://example.org/echo", "spiffe://example.org/auth"
	keyFile := filepath.Join(dir, "auth.key")
	authURL := "https://127.0.0.1:" + startServe(t, "--identity", filepath.Join(dir, "auth"), "--service", "auth",
		"--token-signing-key", keyFile, "--token-ttl", "2m")
	metrics := freeAddr(t)
	echoURL := "https://127.0.0.1:" + startServe(t, "--identity", filepath.Join(dir, "echo"), "--service", "echo", "--metrics", metrics,
		"--require-token", "--token-issuer", authID, "--token-public-key", auth.PublicKeyFile(keyFile))

	call := func(extra ...string) (int, string) {
		args := append([]string{"call", "--identity", filepath.Join(dir, "client"), "--addr", echoURL, "--server-id", echoID}, extra...)
		code, out, errOut := veil(t, ctx, append(args, "/veil.echo.v1.EchoService/Echo", `{"message":"with a token"}`)...)
		return code, out + errOut
	}
	if code, out := call("--token-from", authURL, "--token-server-id", authID); code != 0 || !strings.Contains(out, "with a token") {
		t.Fatalf("veil call --token-from: exit %d %s", code, out)
	}
	if code, out := call(); code != 1 || !strings.Contains(out, "unauthenticated") || !strings.Contains(out, "token service") {
		t.Fatalf("veil call without a token: exit %d %s", code, out)
	}
	if n := authRefusals(t, metrics, rpc.AuthReasonMissing); n != 1 {
		t.Fatalf("token_missing refusals %v, want 1", n)
	}

	// Tokens from the real token service, for the wrong caller or the wrong audience.
	tokenFor := func(identity, audience string) string {
		from, none := authURL, ""
		_, ts, err := tokenClientFlags{from: &from, serverID: &none}.options(filepath.Join(dir, identity), audience, sealAuto)
		if err != nil {
			t.Fatal(err)
		}
		tok, err := ts.Token(ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	stolen := tokenFor("thief", echoID)
	otherAudience := tokenFor("client", "spiffe://example.org/other")
	// An expired token, signed with the token service's own key.
	expired := signToken(t, keyFile, filepath.Join(dir, "client"), echoID, time.Now().Add(-time.Hour), time.Now().Add(-time.Minute))
	// The client's own, valid token, presented without the refreshing interceptor.
	valid := tokenFor("client", echoID)

	hc, _, err := newIdentityClient(filepath.Join(dir, "client"), echoID, sealAuto, nil)
	if err != nil {
		t.Fatal(err)
	}
	echo := echov1connect.NewEchoServiceClient(hc, echoURL, rpc.ClientOptions()...)
	for _, tc := range []struct {
		name, token, reason string
	}{
		{"expired", expired, rpc.AuthReasonExpired},
		{"bound to another certificate", stolen, rpc.AuthReasonNotBound},
		{"for another audience", otherAudience, rpc.AuthReasonAudience},
		{"not a token", "e30.e30.AAAA", rpc.AuthReasonInvalid},
	} {
		before := authRefusals(t, metrics, tc.reason)
		req := connect.NewRequest(&echov1.EchoRequest{Message: "hi"})
		req.Header().Set("Authorization", "Bearer "+tc.token)
		_, err := echo.Echo(ctx, req)
		if connect.CodeOf(err) != connect.CodeUnauthenticated || rpc.AuthReason(err) != tc.reason {
			t.Errorf("%s: %v (reason %q), want unauthenticated (%s)", tc.name, err, rpc.AuthReason(err), tc.reason)
		}
		if n := authRefusals(t, metrics, tc.reason) - before; n != 1 {
			t.Errorf("%s: veil_rpc_auth_refusals_total{reason=%q} rose by %v, want 1", tc.name, tc.reason, n)
		}
	}
	req := connect.NewRequest(&echov1.EchoRequest{Message: "valid"})
	req.Header().Set("Authorization", "Bearer "+valid)
	if res, err := echo.Echo(ctx, req); err != nil || res.Msg.GetMessage() != "valid" {
		t.Fatalf("valid token: %v", err)
	}
	if code, _, errOut := veil(t, ctx, "call", "--identity", filepath.Join(dir, "client"), "--addr", echoURL, "--token-from", authURL,
		"/veil.echo.v1.EchoService/Echo", `{}`); code != 2 || !strings.Contains(errOut, "--server-id") {
		t.Fatalf("--token-from without --server-id: exit %d %q", code, errOut)
	}
	for _, args := range [][]string{
		{"--require-token"},
		{"--require-token", "--token-issuer", authID},
		{"--token-issuer", authID, "--token-public-key", auth.PublicKeyFile(keyFile)},
		{"--service", "auth"},
		{"--service", "auth", "--token-signing-key", keyFile, "--token-ttl", "24h"},
	} {
		args = append([]string{"serve", "--check", "--identity", filepath.Join(dir, "echo"), "--service", "echo"}, args...)
		if code, _, errOut := veil(t, ctx, args...); code != 2 || errOut == "" {
			t.Errorf("veil %v: exit %d %q, want a usage error", args, code, errOut)
		}
	}
}

func mustVeil(t *testing.T, args ...string) {
	t.Helper()
	if code, _, errOut := veil(t, context.Background(), args...); code != 0 {
		t.Fatalf("veil %v: %s", args, errOut)
	}
}

// freeAddr is a loopback address with a port free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// authRefusals sums veil_rpc_auth_refusals_total{reason} on the metrics endpoint.
func authRefusals(t *testing.T, addr, reason string) float64 {
	t.Helper()
	res, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var n float64
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "veil_rpc_auth_refusals_total{") || !strings.Contains(line, `reason="`+reason+`"`) {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndex(line, " ")+1:], 64)
		if err != nil {
			t.Fatal(err)
		}
		n += v
	}
	return n
}

// signToken signs a token with the token service's key for the identity in dir, valid
// from iat to exp: what the service would have issued at iat.
func signToken(t *testing.T, keyFile, dir, audience string, iat, exp time.Time) string {
	t.Helper()
	key, err := auth.LoadOrCreateKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "tls.crt"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	claims := rpc.TokenClaims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer: "spiffe://example.org/auth", Subject: cert.URIs[0].String(), Audience: jwt.ClaimStrings{audience},
			IssuedAt: jwt.NewNumericDate(iat), NotBefore: jwt.NewNumericDate(iat), ExpiresAt: jwt.NewNumericDate(exp), ID: "expired",
		},
		Cnf: rpc.Confirmation{X5tS256: rpc.CertThumbprint(cert)},
	}
	tok, err := jwt.NewWithClaims(jwt.SigningMethodEdDSA, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
