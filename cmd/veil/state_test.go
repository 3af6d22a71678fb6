package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/grpchealth"
	"github.com/nats-io/nats-server/v2/server"
)

// startNATSControl runs a JetStream server in the test process with TLS from the CA
// in caDir (a certificate for localhost issued by `veil ca issue --dns`) and client
// certificates required, with functions to stop it and start it again on the same port
// and store.
func startNATSControl(t *testing.T, caDir, dir string) (url string, stop, restart func()) {
	t.Helper()
	if code, _, errOut := veil(t, context.Background(), "ca", "issue", "--dir", caDir, "--id", "spiffe://example.org/nats", "--dns", "localhost", "--out", dir); code != 0 {
		t.Fatal(errOut)
	}
	tlsc, err := server.GenTLSConfig(&server.TLSConfigOpts{
		CertFile: filepath.Join(dir, "tls.crt"), KeyFile: filepath.Join(dir, "tls.key"), CaFile: filepath.Join(dir, "ca.crt"), Verify: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	opts := &server.Options{Host: "localhost", Port: -1, JetStream: true, StoreDir: t.TempDir(),
		TLS: true, TLSVerify: true, TLSConfig: tlsc, TLSTimeout: 5, NoSigs: true, NoLog: true}
	var srv *server.Server
	start := func() {
		var err error
		if srv, err = server.NewServer(opts); err != nil {
			t.Fatal(err)
		}
		go srv.Start()
		if !srv.ReadyForConnections(10 * time.Second) {
			t.Fatal("nats-server did not start")
		}
	}
	stop = func() {
		if srv != nil {
			srv.Shutdown()
			srv.WaitForShutdown()
			srv = nil
		}
	}
	start()
	opts.Port = srv.Addr().(*net.TCPAddr).Port
	t.Cleanup(stop)
	return "tls://localhost:" + strconv.Itoa(opts.Port), stop, start
}

// Two `veil serve --state nats` replicas of analytics: a study created through one is
// used through the other, a retry through the other counts once, and the result
// through either holds every submission.
func TestServeStateNATS(t *testing.T) {
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
	caDir := filepath.Join(dir, "ca")
	run("ca", "init", "--dir", caDir, "--trust-domain", "example.org")
	for _, id := range []string{"analytics", "analyst", "ns/clinics/sa/a", "ns/clinics/sa/b"} {
		run("ca", "issue", "--dir", caDir, "--id", "spiffe://example.org/"+id, "--out", filepath.Join(dir, strings.ReplaceAll(id, "/", "_")))
	}
	url, stopNATS, startNATSAgain := startNATSControl(t, caDir, filepath.Join(dir, "nats"))
	cfg := filepath.Join(dir, "serve.yaml")
	if err := os.WriteFile(cfg, []byte("service: [analytics]\nidentity: "+filepath.Join(dir, "analytics")+"\nstate:\n  backend: nats\n  url: "+url+"\n  replicas: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Submissions are also checked against the service's shared replay store.
	const submit = "/veil.analytics.v1.AnalyticsService/Submit"
	addr1 := "https://127.0.0.1:" + startServe(t, "--config", cfg, "--state-replay-procedure", submit)
	addr2 := "https://127.0.0.1:" + startServe(t, "--config", cfg, "--state-replay-procedure", submit)
	csv := filepath.Join(dir, "a.csv")
	if err := os.WriteFile(csv, []byte("1\n2\n6\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	keys := filepath.Join(dir, "analyst.keys")
	run("keys", "gen", "--out", keys)
	run("analytics", "create", "--keys", keys, "--identity", filepath.Join(dir, "analyst"), "--addr", addr1,
		"--study", "heights", "--owner", "spiffe://example.org/ns/clinics/sa/*", "--dimension", "1", "--range", "0:100",
		"--min-owners", "2", "--max-submissions", "2")
	// Owners check the analyst's signed study before they encrypt (docs/services.md).
	submitArgs := func(owner, addr, key string) []string {
		return []string{"analytics", "submit", "--identity", filepath.Join(dir, "ns_clinics_sa_"+owner), "--addr", addr, "--study", "heights",
			"--analyst", "spiffe://example.org/analyst", "--csv", csv, "--idempotency-key", key, "--json"}
	}
	first := run(submitArgs("a", addr2, "day-1")...)
	again := run(submitArgs("a", addr1, "day-1")...)
	if strings.Contains(first, `"duplicate": true`) || !strings.Contains(again, `"duplicate": true`) {
		t.Fatalf("submit through replica 2: %s; retry through replica 1: %s", first, again)
	}
	// One owner is not enough to close the study (safe release: no result from one owner).
	if code, _, errOut := veil(t, ctx, "analytics", "close", "--identity", filepath.Join(dir, "analyst"), "--addr", addr1, "--study", "heights"); code != 1 || !strings.Contains(errOut, "failed_precondition") {
		t.Fatalf("close with one owner: exit %d %s", code, errOut)
	}

	// A NATS outage: the replicas report NOT_SERVING and answer unavailable; once NATS
	// is back they serve again, with the data NATS had acknowledged.
	stopNATS()
	health := func(addr string) grpchealth.Status {
		hc, _, err := newIdentityClient(filepath.Join(dir, "analyst"), "", sealAuto, nil)
		if err != nil {
			t.Fatal(err)
		}
		res, err := grpchealth.NewClient(hc, addr).Check(ctx, &grpchealth.CheckRequest{})
		if err != nil {
			t.Logf("health check of %s: %v", addr, err)
			return grpchealth.StatusUnknown
		}
		return res.Status
	}
	waitHealth := func(addr string, want grpchealth.Status) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); health(addr) != want; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: health %v, want %v", addr, health(addr), want)
			}
		}
	}
	waitHealth(addr1, grpchealth.StatusNotServing)
	waitHealth(addr2, grpchealth.StatusNotServing)
	code, _, errOut := veil(t, ctx, submitArgs("b", addr2, "day-2")...)
	if code != 1 || !strings.Contains(errOut, "unavailable") {
		t.Fatalf("submit during the outage: exit %d %s", code, errOut)
	}
	startNATSAgain()
	waitHealth(addr1, grpchealth.StatusServing)
	waitHealth(addr2, grpchealth.StatusServing)
	run(submitArgs("b", addr2, "day-2")...)
	run("analytics", "close", "--identity", filepath.Join(dir, "analyst"), "--addr", addr1, "--study", "heights")
	for _, addr := range []string{addr1, addr2} {
		out := run("analytics", "result", "--keys", keys, "--identity", filepath.Join(dir, "analyst"), "--addr", addr, "--study", "heights", "--json")
		if !strings.Contains(out, `"count": 6`) || !strings.Contains(out, `"mean": [`) {
			t.Fatalf("result through %s after the outage: %s", addr, out)
		}
	}
}

func TestServeCheck(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.yaml", "service: [analytics]\nidentity: /nonexistent\nstate:\n  backend: nats\n  url: tls://nats:4222\n  replicas: 3\npolicy:\n  - procedure: /veil.analytics.v1.AnalyticsService/*\n    allow: [spiffe://example.org/ns/*/sa/*]\n")
	code, out, errOut := veil(t, ctx, "serve", "--check", "--config", good)
	if code != 0 || !strings.Contains(out, "configuration ok") || !strings.Contains(out, "state nats") {
		t.Fatalf("check of a good file: exit %d %s %s", code, out, errOut)
	}
	for name, body := range map[string]string{
		"state-unknown.yaml":  "service: [echo]\nstate:\n  backend: nats\n  url: tls://x:4222\n  replica: 3\n",
		"state-nourl.yaml":    "service: [echo]\nstate:\n  backend: nats\n",
		"state-backend.yaml":  "service: [echo]\nstate:\n  backend: etcd\n",
		"state-scalar.yaml":   "service: [echo]\nstate: nats\n",
		"state-replicas.yaml": "service: [echo]\nstate:\n  backend: nats\n  url: tls://x:4222\n  replicas: 7\n",
		"state-dirs.yaml":     "service: [analytics]\nanalytics-store: /tmp/x\nstate:\n  backend: nats\n  url: tls://x:4222\n",
		"service.yaml":        "service: [payroll]\n",
		"policy.yaml":         "service: [echo]\npolicy:\n  - procedure: /x.v1.S/*\n    allow: [not-a-spiffe-id]\n",
		"seal.yaml":           "service: [echo]\npq-seal: maybe\n",
	} {
		code, _, errOut := veil(t, ctx, "serve", "--check", "--config", write(name, body))
		if code != 2 || errOut == "" {
			t.Errorf("%s: exit %d %q, want 2 with a message", name, code, errOut)
		}
	}
}
