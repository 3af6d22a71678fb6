package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilrpc/veil/services/scoring"
)

func veil(t *testing.T, ctx context.Context, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(ctx, args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestDemoJSON(t *testing.T) {
	code, out, errOut := veil(t, context.Background(), "demo", "--json", "--samples", "500")
	if code != 0 {
		t.Fatalf("demo exit %d: %s\n%s", code, errOut, out)
	}
	if errOut != "" {
		t.Fatalf("demo --json wrote to stderr: %q", errOut)
	}
	// The fields scripts rely on, by their JSON names.
	var doc map[string]any
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("demo --json: %v\n%s", err, out)
	}
	field := func(path ...string) any {
		var v any = doc
		for _, p := range path {
			m, ok := v.(map[string]any)
			if !ok {
				t.Fatalf("demo --json has no %v", path)
			}
			v = m[p]
		}
		if v == nil {
			t.Fatalf("demo --json has no %v", path)
		}
		return v
	}
	if field("tls_group") != "X25519MLKEM768" || field("pq_suite") != "X25519MLKEM768-SHA256" {
		t.Fatalf("tls_group %v pq_suite %v", field("tls_group"), field("pq_suite"))
	}
	if n := field("scoring", "samples").(float64); n != 500 {
		t.Fatalf("scoring.samples %v", n)
	}
	if a := field("scoring", "agreement").(float64); a < 0.99 {
		t.Fatalf("scoring.agreement %v", a)
	}
	if e := field("scoring", "max_abs_error").(float64); e <= 0 || e > 0.01 {
		t.Fatalf("scoring.max_abs_error %v", e)
	}
	if o := field("analytics", "owners").(float64); o != 3 {
		t.Fatalf("analytics.owners %v", o)
	}
	if e := field("analytics", "max_abs_error").(float64); e > 1e-3 {
		t.Fatalf("analytics.max_abs_error %v", e)
	}
	// The committee study: three members, t = 2, one offline; one alone refused.
	if m, th, w := field("committee", "members").(float64), field("committee", "threshold").(float64), field("committee", "released_with").(float64); m != 3 || th != 2 || w != 2 {
		t.Fatalf("committee: %v members, threshold %v, released with %v", m, th, w)
	}
	if !field("committee", "lone_member_refused").(bool) {
		t.Fatal("committee: one member alone got a result")
	}
	if e := field("committee", "max_abs_error").(float64); e <= 0 || e > 1 {
		t.Fatalf("committee.max_abs_error %v", e)
	}
	if s := field("total_seconds").(float64); s <= 0 {
		t.Fatalf("total_seconds %v", s)
	}
	var rep demoReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Calls) != 8 {
		t.Fatalf("%d calls, want 8 (3 protocols x kinds)", len(rep.Calls))
	}
	if len(rep.Refused) != 4 || !strings.HasPrefix(rep.Refused[0].Result, "handshake refused") ||
		!strings.HasPrefix(rep.Refused[1].Result, "unauthenticated") || !strings.HasPrefix(rep.Refused[2].Result, "permission_denied") ||
		!strings.HasPrefix(rep.Refused[3].Result, "unauthenticated") || !strings.Contains(rep.Refused[3].Result, "access token") {
		t.Fatalf("refusals %+v", rep.Refused)
	}
	// Continuous authentication: a token expired mid-run (the servers' clock passed its
	// expiry), the server refused it, the client refreshed it and retried: no call failed.
	tk := rep.Tokens
	if field("tokens", "failed_calls").(float64) != 0 || tk.FailedCalls != 0 || tk.Calls == 0 {
		t.Fatalf("tokens: %d of %d calls failed", tk.FailedCalls, tk.Calls)
	}
	if tk.Refreshed < 2 || tk.RefreshedEarly < 1 || tk.RefreshedOnExpiry < 1 || tk.ExpiredRefusals < 1 {
		t.Fatalf("tokens %+v: want an early refresh, and an expiry refusal followed by a refresh", tk)
	}
	if tk.Issued < tk.Refreshed+1 {
		t.Fatalf("tokens %+v: fewer issued than fetched", tk)
	}
}

func TestUsageErrors(t *testing.T) {
	ctx := context.Background()
	for _, args := range [][]string{
		{},
		{"nope"},
		{"ca"},
		{"ca", "init"},
		{"ca", "issue", "--dir", "x"},
		{"serve"},
		{"serve", "--identity", "x", "--pq", "maybe", "--service", "echo"},
		{"serve", "--identity", "x", "--pq-seal", "on", "--service", "echo"}, // a client's value
		{"serve", "--identity", "x", "--pq-seal", "maybe", "--service", "echo", "--check"},
		{"demo", "--bogus"},
		// Through a proxy the sealed credential is the only statement of who answers.
		{"call", "--identity", "x", "--addr", "https://localhost:1", "--pq-seal", "proxied", "/p", "{}"},
		{"call", "--identity", "x", "--addr", "https://localhost:1", "--pq-seal", "maybe", "/p", "{}"},
		{"serve", "--identity", "x", "--service", "echo", "--state-replay-procedure", "/p"}, // needs --state nats
		// A committee member releases (--active) or only deals its shares (--setup-only).
		{"analytics", "join", "--identity", "x", "--addr", "https://localhost:1", "--study", "s", "--analyst", "spiffe://example.org/a"},
		{"analytics", "join", "--identity", "x", "--addr", "https://localhost:1", "--study", "s", "--analyst", "spiffe://example.org/a", "--active", "one"},
		{"analytics", "create", "--keys", "k", "--identity", "x", "--addr", "https://localhost:1", "--study", "s", "--owner", "*", "--dimension", "1", "--range", "0:1", "--member", "spiffe://example.org/m"},
		{"analytics", "create", "--keys", "k", "--identity", "x", "--addr", "https://localhost:1", "--study", "s", "--owner", "*", "--dimension", "1", "--range", "0:1", "--epsilon-per-release", "1"},
	} {
		if code, _, errOut := veil(t, ctx, args...); code != 2 || errOut == "" {
			t.Errorf("veil %v: exit %d stderr %q, want 2 with a message", args, code, errOut)
		}
	}
	if code, _, _ := veil(t, ctx, "serve", "--help"); code != 0 {
		t.Errorf("--help exit %d", code)
	}
	if code, _, errOut := veil(t, ctx, "serve", "--identity", t.TempDir(), "--service", "echo"); code != 1 || !strings.Contains(errOut, "tls.crt") {
		t.Errorf("missing identity: exit %d %q", code, errOut)
	}
}

// TestServeWithPlainHTTPClient runs `veil serve` and calls it the way curl does: an
// HTTP/1.1 Connect JSON POST with a client certificate, verifying the server's host name
// against ca.crt. Without a client certificate the handshake fails.
func TestServeWithPlainHTTPClient(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	mustRun := func(args ...string) {
		if code, _, errOut := veil(t, ctx, args...); code != 0 {
			t.Fatalf("veil %v: %s", args, errOut)
		}
	}
	mustRun("ca", "init", "--dir", filepath.Join(dir, "ca"), "--trust-domain", "example.org")
	mustRun("ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/echo", "--out", filepath.Join(dir, "echo"), "--dns", "localhost")
	mustRun("ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/client", "--out", filepath.Join(dir, "client"))

	// curl speaks plain Connect JSON: this server does not require sealing.
	port := startServe(t, "--identity", filepath.Join(dir, "echo"), "--service", "echo", "--pq-seal", "off",
		"--pq", "permissive") // curl built with OpenSSL before 3.5 offers no post-quantum group
	url := "https://localhost:" + port + "/veil.echo.v1.EchoService/Echo"

	roots := x509.NewCertPool()
	caPEM, _ := os.ReadFile(filepath.Join(dir, "echo", "ca.crt"))
	roots.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client", "tls.crt"), filepath.Join(dir, "client", "tls.key"))
	if err != nil {
		t.Fatal(err)
	}
	withCert := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cert}}}}
	withoutCert := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}

	var res *http.Response
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if res, err = withCert.Post(url, "application/json", strings.NewReader(`{"message":"hi"}`)); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || strings.TrimSpace(string(body)) != `{"message":"hi"}` {
		t.Fatalf("status %d body %s", res.StatusCode, body)
	}
	if res.ProtoMajor != 1 {
		t.Fatalf("proto %s, want HTTP/1.1 like curl's default", res.Proto)
	}
	if res, err := withoutCert.Post(url, "application/json", strings.NewReader(`{"message":"hi"}`)); err == nil {
		res.Body.Close()
		t.Fatalf("call without a client certificate answered %d", res.StatusCode)
	}

	// veil call seals the call end to end with the identity's pq.cred; the server
	// (sealing strict by default, since its identity holds pq.cred) refuses it unsealed.
	base := "https://127.0.0.1:" + startServe(t, "--identity", filepath.Join(dir, "echo"), "--service", "echo")
	code, out, errOut := veil(t, ctx, "call", "--identity", filepath.Join(dir, "client"), "--addr", base, "--server-id", "spiffe://example.org/echo", "-v",
		"/veil.echo.v1.EchoService/Echo", `{"message":"sealed hello"}`)
	if code != 0 || !strings.Contains(out, `"sealed hello"`) || !strings.Contains(errOut, "X25519MLKEM768") || !strings.Contains(errOut, "pq-seal: on") {
		t.Fatalf("veil call: exit %d out %q err %q", code, out, errOut)
	}
	code, out, _ = veil(t, ctx, "call", "--identity", filepath.Join(dir, "client"), "--addr", base, "--protocol", "grpc",
		"/veil.echo.v1.EchoService/EchoStream", `{"message":"s","count":3}`)
	if code != 0 || strings.Count(out, `"s"`) != 3 {
		t.Fatalf("veil call stream: exit %d out %q", code, out)
	}
	if code, _, errOut := veil(t, ctx, "call", "--identity", filepath.Join(dir, "client"), "--addr", base, "--pq-seal", "off",
		"/veil.echo.v1.EchoService/Echo", `{"message":"clear"}`); code != 1 || !strings.Contains(errOut, "unauthenticated") {
		t.Fatalf("unsealed veil call: exit %d err %q", code, errOut)
	}
	// grpcurl's form, without the leading slash, calls the same procedure.
	code, out, errOut = veil(t, ctx, "call", "--identity", filepath.Join(dir, "client"), "--addr", base+"/",
		"veil.echo.v1.EchoService/Echo", `{"message":"grpcurl form"}`)
	if code != 0 || !strings.Contains(out, `"grpcurl form"`) {
		t.Fatalf("veil call veil.echo.v1.EchoService/Echo: exit %d out %q err %q", code, out, errOut)
	}
	for _, procedure := range []string{"/veil.echo.v1.EchoService/Nope", "veil.echo.v1.Nope/Echo"} {
		code, _, errOut := veil(t, ctx, "call", "--identity", filepath.Join(dir, "client"), "--addr", base, procedure, `{}`)
		if code != 2 || !strings.Contains(errOut, "not compiled into veil") || !strings.Contains(errOut, "veil.echo.v1.EchoService/Echo") {
			t.Fatalf("veil call %s: exit %d, stderr %q; want 2 and the list of procedures", procedure, code, errOut)
		}
	}

	// The same with the real curl, where the machine has it.
	if curl, err := exec.LookPath("curl"); err == nil {
		out, err := exec.Command(curl, "-sS", "--cert", filepath.Join(dir, "client", "tls.crt"), "--key", filepath.Join(dir, "client", "tls.key"),
			"--cacert", filepath.Join(dir, "echo", "ca.crt"), "-H", "Content-Type: application/json", "-d", `{"message":"hi curl"}`, url).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != `{"message":"hi curl"}` {
			t.Fatalf("curl: %v: %s", err, out)
		}
		if out, err := exec.Command(curl, "-sS", "--cacert", filepath.Join(dir, "echo", "ca.crt"), "-H", "Content-Type: application/json", "-d", `{"message":"x"}`, url).CombinedOutput(); err == nil {
			t.Fatalf("curl without a client certificate succeeded: %s", out)
		}
	} else {
		t.Log("curl is not installed; the net/http client above made the same calls")
	}
}

// startServe runs `veil serve` with args on a free loopback port until the test ends
// and returns the port once it answers.
func startServe(t *testing.T, args ...string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var serveErr bytes.Buffer
	go func() {
		done <- run(ctx, append(append([]string{"serve"}, args...), "--listen", addr), io.Discard, &serveErr)
	}()
	t.Cleanup(func() {
		stop()
		if code := <-done; code != 0 {
			t.Errorf("serve exit %d: %s", code, serveErr.String())
		}
	})
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
	}
	return addr[strings.LastIndex(addr, ":")+1:]
}

func TestServeConfigFile(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	for _, args := range [][]string{
		{"ca", "init", "--dir", filepath.Join(dir, "ca"), "--trust-domain", "example.org"},
		{"ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/echo", "--out", filepath.Join(dir, "echo")},
		{"ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/ns/a/sa/client", "--out", filepath.Join(dir, "client")},
		{"ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/other", "--out", filepath.Join(dir, "other")},
	} {
		if code, _, errOut := veil(t, ctx, args...); code != 0 {
			t.Fatalf("veil %v: %s", args, errOut)
		}
	}
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.yaml", `
identity: `+filepath.Join(dir, "echo")+`
listen: 127.0.0.1:1
pq: strict
service: [echo]
allow: spiffe://example.org/nobody
policy:
  - procedure: /veil.echo.v1.EchoService/Echo
    allow: ["spiffe://example.org/ns/*/sa/*"]
`)
	// --listen on the command line overrides the file's unusable port.
	port := startServe(t, "--config", good)
	call := func(identity string) (int, string) {
		code, out, errOut := veil(t, ctx, "call", "--identity", filepath.Join(dir, identity), "--addr", "https://127.0.0.1:"+port,
			"/veil.echo.v1.EchoService/Echo", `{"message":"configured"}`)
		return code, out + errOut
	}
	if code, out := call("client"); code != 0 || !strings.Contains(out, "configured") {
		t.Fatalf("allowed by the file's policy: exit %d %s", code, out)
	}
	if code, out := call("other"); code != 1 || !strings.Contains(out, "permission_denied") {
		t.Fatalf("not in the policy: exit %d %s", code, out)
	}
	for name, body := range map[string]string{
		"unknown.yaml":   "identity: x\nlistn: y\n",
		"badvalue.yaml":  "grace: forever\n",
		"badpolicy.yaml": "policy:\n  - procedure: /x.v1.S/*\n    alow: [spiffe://x]\n",
		"nested.yaml":    "listen: {a: b}\n",
	} {
		code, _, errOut := veil(t, ctx, "serve", "--config", write(name, body), "--identity", filepath.Join(dir, "echo"), "--service", "echo")
		if code != 2 || !strings.Contains(errOut, name) {
			t.Errorf("%s: exit %d %q, want 2 naming the file", name, code, errOut)
		}
	}
}

// TestScoreCSV trains a model, serves it with `veil serve --service scoring`, and
// scores a CSV with `veil score`: the probabilities decrypted on the client match the
// plaintext model's.
func TestScoreCSV(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	data, err := scoring.Synthetic(3, 300, 4)
	if err != nil {
		t.Fatal(err)
	}
	model, err := scoring.Train(data.X, data.Y, scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	modelPath := filepath.Join(dir, "model.json")
	if err := model.Save(modelPath); err != nil {
		t.Fatal(err)
	}
	var csv strings.Builder
	fmt.Fprintf(&csv, "40,4,negative,positive\n")
	for i, x := range data.X[:40] {
		for _, v := range x {
			fmt.Fprintf(&csv, "%v,", v)
		}
		fmt.Fprintf(&csv, "%d\n", data.Y[i])
	}
	csvPath := filepath.Join(dir, "samples.csv")
	if err := os.WriteFile(csvPath, []byte(csv.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"ca", "init", "--dir", filepath.Join(dir, "ca"), "--trust-domain", "example.org"},
		{"ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/scoring", "--out", filepath.Join(dir, "scoring")},
		{"ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/client", "--out", filepath.Join(dir, "client")},
	} {
		if code, _, errOut := veil(t, ctx, args...); code != 0 {
			t.Fatalf("veil %v: %s", args, errOut)
		}
	}
	port := startServe(t, "--identity", filepath.Join(dir, "scoring"), "--service", "scoring", "--scoring-model", modelPath, "--http3")
	// Over HTTP/2, and over HTTP/3 (the server serves both).
	for _, h3 := range []string{"--http3=off", "--http3"} {
		code, out, errOut := veil(t, ctx, "score", "--identity", filepath.Join(dir, "client"), "--addr", "https://127.0.0.1:"+port,
			"--server-id", "spiffe://example.org/scoring", "--csv", csvPath, "--json", h3)
		if code != 0 {
			t.Fatalf("veil score %s: exit %d: %s", h3, code, errOut)
		}
		var res scoreResult
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if res.Samples != 40 || len(res.Probabilities) != 40 || res.Accuracy == nil || res.KeyBytes == 0 {
			t.Fatalf("result %+v", res)
		}
		for i, p := range res.Probabilities {
			if want := model.Predict(data.X[i]); math.Abs(p-want) > 0.01 {
				t.Fatalf("sample %d: encrypted %v, plaintext %v", i, p, want)
			}
		}
	}
	// Evaluation keys uploaded on their own, from a key file, for the scoring procedure.
	keys := filepath.Join(dir, "client.keys")
	if code, _, errOut := veil(t, ctx, "keys", "gen", "--params", "n13", "--out", keys); code != 0 {
		t.Fatalf("keys gen: %s", errOut)
	}
	code, out, errOut := veil(t, ctx, "keys", "upload", "--keys", keys, "--identity", filepath.Join(dir, "client"), "--addr", "https://127.0.0.1:"+port, "--json")
	if code != 0 || !strings.Contains(out, `"key_id"`) {
		t.Fatalf("keys upload: exit %d %s %s", code, out, errOut)
	}
	if code, _, errOut := veil(t, ctx, "score", "--identity", filepath.Join(dir, "client"), "--addr", "https://127.0.0.1:"+port, "--csv", filepath.Join(dir, "missing.csv")); code != 1 || errOut == "" {
		t.Fatalf("missing CSV: exit %d %q", code, errOut)
	}
}

// TestAnalyticsCLI runs the analyst and owner flows as separate commands, the way
// different people and processes would: the analyst's key file carries the secret key
// from `create` to `result`.
func TestAnalyticsCLI(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	run := func(args ...string) string {
		t.Helper()
		code, out, errOut := veil(t, ctx, args...)
		if code != 0 {
			t.Fatalf("veil %v: exit %d: %s", args, code, errOut)
		}
		return out
	}
	run("ca", "init", "--dir", filepath.Join(dir, "ca"), "--trust-domain", "example.org")
	for _, id := range []string{"analytics", "analyst", "ns/clinics/sa/a", "ns/clinics/sa/b"} {
		run("ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/"+id, "--out", filepath.Join(dir, strings.ReplaceAll(id, "/", "_")))
	}
	addr := "https://127.0.0.1:" + startServe(t, "--identity", filepath.Join(dir, "analytics"), "--service", "analytics")
	keys := filepath.Join(dir, "analyst.keys")
	run("keys", "gen", "--out", keys)
	run("analytics", "create", "--keys", keys, "--identity", filepath.Join(dir, "analyst"), "--addr", addr,
		"--study", "heights", "--owner", "spiffe://example.org/ns/clinics/sa/*", "--dimension", "2", "--range", "0:10")
	records := map[string]string{"ns_clinics_sa_a": "1.5,2\n2.5,4\n", "ns_clinics_sa_b": "3.5,6\n"}
	for owner, csv := range records {
		p := filepath.Join(dir, owner+".csv")
		if err := os.WriteFile(p, []byte(csv), 0o600); err != nil {
			t.Fatal(err)
		}
		run("analytics", "submit", "--identity", filepath.Join(dir, owner), "--addr", addr, "--study", "heights", "--analyst", "spiffe://example.org/analyst", "--csv", p, "--idempotency-key", "day-1")
	}
	again := run("analytics", "submit", "--identity", filepath.Join(dir, "ns_clinics_sa_a"), "--addr", addr, "--study", "heights", "--analyst", "spiffe://example.org/analyst",
		"--csv", filepath.Join(dir, "ns_clinics_sa_a.csv"), "--idempotency-key", "day-1", "--json")
	if !strings.Contains(again, `"duplicate": true`) {
		t.Fatalf("retried submission: %s", again)
	}
	if out := run("analytics", "close", "--identity", filepath.Join(dir, "analyst"), "--addr", addr, "--study", "heights", "--json"); !strings.Contains(out, `"owners": 2`) {
		t.Fatalf("close: %s", out)
	}
	var res struct {
		Count    int       `json:"count"`
		Mean     []float64 `json:"mean"`
		Variance []float64 `json:"variance"`
	}
	out := run("analytics", "result", "--keys", keys, "--identity", filepath.Join(dir, "analyst"), "--addr", addr, "--study", "heights", "--json")
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	// Records (1.5,2) (2.5,4) (3.5,6): means 2.5 and 4, variances 2/3 and 8/3.
	want := []float64{2.5, 4, 2.0 / 3, 8.0 / 3}
	got := append(append([]float64{}, res.Mean...), res.Variance...)
	if res.Count != 3 || len(got) != 4 {
		t.Fatalf("result %s", out)
	}
	for i := range want {
		if math.Abs(got[i]-want[i]) > 1e-4 {
			t.Fatalf("statistic %d: %v, want %v (%s)", i, got[i], want[i], out)
		}
	}
	// Only the analyst may fetch it.
	if code, _, errOut := veil(t, ctx, "analytics", "result", "--keys", keys, "--identity", filepath.Join(dir, "ns_clinics_sa_b"), "--addr", addr, "--study", "heights"); code != 1 || !strings.Contains(errOut, "permission_denied") {
		t.Fatalf("owner fetching the result: exit %d %s", code, errOut)
	}
}

// TestAnalyticsCommitteeCLI runs a 2-of-3 committee study with one process per
// party: the third member deals its key shares and leaves; the first two release
// once the analyst closes; no result exists before.
func TestAnalyticsCommitteeCLI(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	run := func(args ...string) string {
		t.Helper()
		code, out, errOut := veil(t, ctx, args...)
		if code != 0 {
			t.Fatalf("veil %v: exit %d: %s", args, code, errOut)
		}
		return out
	}
	run("ca", "init", "--dir", filepath.Join(dir, "ca"), "--trust-domain", "example.org")
	members := []string{"ns/banks/sa/a", "ns/banks/sa/b", "ns/banks/sa/c"}
	for _, id := range append([]string{"analytics", "analyst", "ns/clinics/sa/a", "ns/clinics/sa/b"}, members...) {
		run("ca", "issue", "--dir", filepath.Join(dir, "ca"), "--id", "spiffe://example.org/"+id, "--out", filepath.Join(dir, strings.ReplaceAll(id, "/", "_")))
	}
	addr := "https://127.0.0.1:" + startServe(t, "--identity", filepath.Join(dir, "analytics"), "--service", "analytics")
	keys := filepath.Join(dir, "analyst.keys")
	run("keys", "gen", "--out", keys)
	args := []string{"analytics", "create", "--keys", keys, "--identity", filepath.Join(dir, "analyst"), "--addr", addr,
		"--study", "joint", "--owner", "spiffe://example.org/ns/clinics/sa/*", "--dimension", "2", "--range", "0:10", "--threshold", "2", "--json"}
	for _, m := range members {
		args = append(args, "--member", "spiffe://example.org/"+m)
	}
	if out := run(args...); !strings.Contains(out, `"threshold": 2`) {
		t.Fatalf("create: %s", out)
	}
	type joined struct {
		code     int
		out, err string
	}
	join := func(i int, extra ...string) chan joined {
		ch := make(chan joined, 1)
		go func() {
			code, out, errOut := veil(t, ctx, append([]string{"analytics", "join", "--identity", filepath.Join(dir, strings.ReplaceAll(members[i], "/", "_")), "--addr", addr,
				"--study", "joint", "--analyst", "spiffe://example.org/analyst", "--poll", "20ms", "--json"}, extra...)...)
			ch <- joined{code, out, errOut}
		}()
		return ch
	}
	third := join(2, "--setup-only")
	first, second := join(0, "--active", "1,2"), join(1, "--active", "1,2")
	if j := <-third; j.code != 0 || !strings.Contains(j.out, `"setup": "done"`) {
		t.Fatalf("third member: exit %d %s %s", j.code, j.out, j.err)
	}
	// 100 copies of each record: the smudging noise members add to their release shares
	// is of order 0.1-0.3 on a decrypted sum (docs/he.md), so the mean of 300 records is
	// off by about 1e-3, far inside the check below; the mean of 3 would not be.
	records := map[string]string{"ns_clinics_sa_a": strings.Repeat("1.5,2\n2.5,4\n", 100), "ns_clinics_sa_b": strings.Repeat("3.5,6\n", 100)}
	for owner, csv := range records {
		p := filepath.Join(dir, owner+".csv")
		if err := os.WriteFile(p, []byte(csv), 0o600); err != nil {
			t.Fatal(err)
		}
		run("analytics", "submit", "--identity", filepath.Join(dir, owner), "--addr", addr, "--study", "joint", "--analyst", "spiffe://example.org/analyst", "--csv", p, "--idempotency-key", "day-1")
	}
	if code, _, errOut := veil(t, ctx, "analytics", "result", "--keys", keys, "--identity", filepath.Join(dir, "analyst"), "--addr", addr, "--study", "joint"); code != 1 || !strings.Contains(errOut, "failed_precondition") {
		t.Fatalf("result of an open study: exit %d %s", code, errOut)
	}
	run("analytics", "close", "--identity", filepath.Join(dir, "analyst"), "--addr", addr, "--study", "joint")
	ready := 0
	for i, ch := range []chan joined{first, second} {
		j := <-ch
		if j.code != 0 {
			t.Fatalf("member %d: exit %d %s %s", i+1, j.code, j.out, j.err)
		}
		if strings.Contains(j.out, `"ready": true`) {
			ready++
		}
	}
	if ready != 1 {
		t.Fatalf("%d members saw the result ready, want exactly the second to send its share", ready)
	}
	var res struct {
		Count int       `json:"count"`
		Mean  []float64 `json:"mean"`
	}
	out := run("analytics", "result", "--keys", keys, "--identity", filepath.Join(dir, "analyst"), "--addr", addr, "--study", "joint", "--json")
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	// Records (1.5,2) (2.5,4) (3.5,6), 100 of each: means 2.5 and 4, within the smudging error.
	if res.Count != 300 || len(res.Mean) != 2 || math.Abs(res.Mean[0]-2.5) > 0.1 || math.Abs(res.Mean[1]-4) > 0.1 {
		t.Fatalf("result %s", out)
	}
}
