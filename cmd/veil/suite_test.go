package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The ShangMi suite from the command line: a CA with an SM2 key issues ShangMi sealing
// identities, a server that requires the suite serves a ShangMi client and refuses, with
// nothing sent in clear, a client of the default suite.
func TestShangMiSuiteCLI(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	mustRun := func(args ...string) string {
		t.Helper()
		code, out, errOut := veil(t, ctx, args...)
		if code != 0 {
			t.Fatalf("veil %v: %s", args, errOut)
		}
		return out
	}
	ca := filepath.Join(dir, "ca")
	if out := mustRun("ca", "init", "--dir", ca, "--trust-domain", "example.org", "--sm2", "--json"); !strings.Contains(out, `"sm2": true`) {
		t.Fatalf("ca init --sm2 --json: %s", out)
	}
	if fi, err := os.Stat(filepath.Join(ca, "root-sm2.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("root-sm2.key: %v %v", fi, err)
	}
	mustRun("ca", "issue", "--dir", ca, "--id", "spiffe://example.org/echo", "--out", filepath.Join(dir, "echo"), "--pq-suite", "sm2mlkem768")
	mustRun("ca", "issue", "--dir", ca, "--id", "spiffe://example.org/client", "--out", filepath.Join(dir, "smclient"), "--pq-suite", "sm")
	mustRun("ca", "issue", "--dir", ca, "--id", "spiffe://example.org/client", "--out", filepath.Join(dir, "client"))
	if code, _, errOut := veil(t, ctx, "ca", "issue", "--dir", ca, "--id", "spiffe://example.org/x", "--out", filepath.Join(dir, "x"), "--pq-suite", "sm3"); code != 2 || !strings.Contains(errOut, "--pq-suite") {
		t.Fatalf("--pq-suite sm3: exit %d %s", code, errOut)
	}
	if code, _, errOut := veil(t, ctx, "serve", "--identity", filepath.Join(dir, "echo"), "--service", "echo", "--pq-suite", "sm", "--pq-seal", "permissive"); code != 2 || !strings.Contains(errOut, "--pq-suite needs --pq-seal strict") {
		t.Fatalf("serve --pq-suite with permissive sealing: exit %d %s", code, errOut)
	}

	base := "https://127.0.0.1:" + startServe(t, "--identity", filepath.Join(dir, "echo"), "--service", "echo", "--pq-suite", "sm")
	call := func(identity string, extra ...string) (int, string, string) {
		args := append([]string{"call", "--identity", filepath.Join(dir, identity), "--addr", base, "--server-id", "spiffe://example.org/echo", "-v"}, extra...)
		return veil(t, ctx, append(args, "/veil.echo.v1.EchoService/Echo", `{"message":"国密 hello"}`)...)
	}
	if code, out, errOut := call("smclient", "--pq-suite", "sm"); code != 0 || !strings.Contains(out, "国密 hello") || !strings.Contains(errOut, "pq-seal: on (SM2MLKEM768-SM3)") {
		t.Fatalf("ShangMi call: exit %d out %q err %q", code, out, errOut)
	}
	if code, _, errOut := call("client"); code == 0 || !strings.Contains(errOut, "unsupported") {
		t.Fatalf("default-suite client to a ShangMi server: exit %d err %q", code, errOut)
	}
	if code, _, errOut := call("client", "--pq-suite", "sm"); code == 0 || !strings.Contains(errOut, "refused by policy") {
		t.Fatalf("default-suite identity under --pq-suite sm: exit %d err %q", code, errOut)
	}
}

// veil demo --suite sm runs the whole demo (online CA, HE services, tokens) on the ShangMi
// suite, and its JSON names the suite.
func TestDemoShangMi(t *testing.T) {
	code, out, errOut := veil(t, context.Background(), "demo", "--json", "--samples", "300", "--suite", "sm")
	if code != 0 {
		t.Fatalf("demo --suite sm exit %d: %s\n%s", code, errOut, out)
	}
	var doc struct {
		PQSuite string `json:"pq_suite"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil || doc.PQSuite != "SM2MLKEM768-SM3" {
		t.Fatalf("demo --suite sm --json: pq_suite %q (%v)", doc.PQSuite, err)
	}
	if code, _, _ := veil(t, context.Background(), "demo", "--suite", "sm3"); code != 2 {
		t.Fatalf("demo --suite sm3: exit %d, want 2", code)
	}
}
