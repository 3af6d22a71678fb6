package pqkex_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/veilrpc/veil/pqkex"
)

// callsTo sends sealed calls (every request but credential fetches and handshakes) to
// another server: a load balancer or proxy that sends a client's ticketed calls to another
// replica of the same service.
type callsTo struct {
	base http.RoundTripper
	to   string // host:port
}

func (r callsTo) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Path != pqkex.HandshakePath && req.URL.Path != pqkex.CredentialPath {
		req = req.Clone(req.Context())
		req.URL.Host, req.Host = r.to, r.to
	}
	return r.base.RoundTrip(req)
}

// A replica that requires the ShangMi suite refuses a ticket of another suite, even one
// sealed under the ticket keys it shares with a replica of that suite (a service migrating
// to ShangMi replica by replica, or a server restarted with the policy while clients hold
// tickets from before): the ticket carries the suite, and the policy covers sealed calls
// as it covers hellos (spec 3.1). Before the fix the call was served with AES-256-GCM.
func TestShangMiOnlyReplicaRefusesOtherSuiteTickets(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	nb, na := testNow.Add(-time.Hour), testNow.Add(24*time.Hour)
	smServer, err := e.ca.Identity(pqkex.SM2MLKEM768(), serverID, nb, na, nil)
	if err != nil {
		t.Fatal(err)
	}
	keys := sharedTicketKeys(t)
	reg := prometheus.NewRegistry()
	plain := e.startServer(t, echoMux(), pqkex.WithTicketKeys(keys()))
	sm := e.startServer(t, echoMux(), pqkex.WithIdentity(smServer), smOnly(), pqkex.WithTicketKeys(keys()), pqkex.WithMetrics(reg))
	ctx := context.Background()

	// Control: the default replica serves the default client.
	hc, _ := e.httpClient(t, e.transport(t, clientID))
	if out, errs := callKinds(ctx, hc, plain.URL, nil, "hi", false); len(errs) != 0 || out["unary"] != "echo:hi|"+clientID {
		t.Fatalf("default replica: %v %v", out, errs)
	}
	// The handshake with the default replica, the calls to the ShangMi-only one.
	hc, _ = e.httpClient(t, callsTo{base: e.transport(t, clientID), to: strings.TrimPrefix(sm.URL, "https://")})
	out, errs := callKinds(ctx, hc, plain.URL, nil, "hi", false)
	for kind, err := range errs {
		// Unauthenticated refusal: unavailable to the caller, with the reason (spec 9).
		if connect.CodeOf(err) != connect.CodeUnavailable || !strings.Contains(err.Error(), "suite_policy") {
			t.Errorf("%s: %v, want suite_policy", kind, err)
		}
	}
	if len(out) != 0 {
		t.Errorf("ShangMi-only replica served a default-suite ticket: %v", out)
	}
	if got := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "server", "reason": "suite_policy"}); got == 0 {
		t.Error("suite_policy refusal of a ticket not counted")
	}
}

// A server that requires a suite serves no call outside it, sealed or not: a procedure
// left Permissive (for a migration) does not let a plaintext call through, which would be
// the end point of every downgrade (docs/compliance.md: "no call is served outside the SM
// suite, sealed or not"; veil serve enforced it by refusing --pq-suite without strict
// sealing, the library did not). The refusal is no_session, as in Strict mode.
func TestSuitePolicyRefusesPlaintextInPermissiveMode(t *testing.T) {
	e := newEnv(t, pqkex.X25519MLKEM768())
	nb, na := testNow.Add(-time.Hour), testNow.Add(24*time.Hour)
	smServer, err := e.ca.Identity(pqkex.SM2MLKEM768(), serverID, nb, na, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	sm := e.startServer(t, echoMux(), pqkex.WithIdentity(smServer), smOnly(), pqkex.WithMode(pqkex.Permissive), pqkex.WithMetrics(reg))
	plain := &http.Client{Transport: e.transport(t, clientID)}
	_, errs := callKinds(context.Background(), plain, sm.URL, nil, "hi", false)
	if len(errs) == 0 {
		t.Fatal("plaintext calls served by a server that requires the ShangMi suite")
	}
	for kind, err := range errs {
		if connect.CodeOf(err) != connect.CodeUnauthenticated {
			t.Errorf("%s: %v, want unauthenticated (no_session)", kind, err)
		}
	}
	if got := counter(t, reg, "veil_pqkex_rejections_total", map[string]string{"side": "server", "reason": "no_session"}); got == 0 {
		t.Error("no_session refusal not counted")
	}
	// Without the policy, Permissive still passes plaintext through (migrations).
	open := e.startServer(t, echoMux(), pqkex.WithMode(pqkex.Permissive))
	if out, errs := callKinds(context.Background(), plain, open.URL, nil, "hi", false); len(errs) != 0 || out["unary"] == "" {
		t.Fatalf("permissive server without a policy: %v %v", out, errs)
	}
}
