package integration

import (
	"context"
	"math"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/pqkex"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
	"github.com/veilrpc/veil/transport"
)

// sealedHTTPClient returns a client for identity name in dir, sealed end to end with
// serverID, whose TLS peer is tlsPeer: bound to the TLS channel when that is the server
// itself, else (a TLS-terminating proxy) unbound and expecting serverID end to end.
func sealedHTTPClient(t *testing.T, dir, name, serverID, tlsPeer string) *http.Client {
	t.Helper()
	id, roots, err := rpc.LoadSealingIdentity(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	opts := []pqkex.Option{pqkex.WithIdentity(id), pqkex.WithRoots(roots), pqkex.WithAuthorizer(pqkex.AuthorizeID(serverID))}
	var ropts []rpc.ClientOption
	if tlsPeer != serverID {
		opts = append(opts, pqkex.WithoutChannelBinding())
		ropts = append(ropts, rpc.WithSealedServer(pqkex.AuthorizeID(serverID)))
	}
	pc, err := pqkex.NewClient(opts...)
	if err != nil {
		t.Fatal(err)
	}
	return rpc.NewHTTPClient(loadSource(t, filepath.Join(dir, name)),
		transport.AuthorizeID(spiffeid.RequireFromString(tlsPeer)), append(ropts, rpc.WithClientSealing(pc))...)
}

// TestAnalyticsAcrossRestart runs the analytics service in a container with its store
// on the container's filesystem: owners submit encrypted records (one twice, counted
// once), authorization mistakes are refused, the container is restarted, and the
// analyst's result still counts every submission and matches the plaintext statistics.
func TestAnalyticsAcrossRestart(t *testing.T) {
	const serverID = "spiffe://example.org/analytics"
	dir := sealedIdentities(t, serverID, "spiffe://example.org/analyst", "spiffe://example.org/intruder",
		"spiffe://example.org/ns/owners/sa/o1", "spiffe://example.org/ns/owners/sa/o2", "spiffe://example.org/outsider")
	c := startVeil(t, containerSpec{
		alias: "analytics", network: newNetwork(t), port: "8443/tcp",
		args: []string{"/veil", "serve", "--identity", "/identity", "--listen", ":8443", "--service", "analytics",
			"--analytics-store", "/data/analytics", "--pq", "strict", "--pq-seal", "strict",
			"--allow", "spiffe://example.org/analyst", "--allow", "spiffe://example.org/intruder", "--allow", "spiffe://example.org/ns/owners/sa/*"},
		files: sealedFiles(dir, "analytics", nil),
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	url := "https://" + c.endpoint(t, "8443/tcp")
	assertRefusesStrangers(t, dir, url, serverID, "outsider", "/veil.analytics.v1.AnalyticsService/GetStudy")
	key, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	analystID := loadSource(t, filepath.Join(dir, "analyst"))
	analystSVID, err := analystID.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	analyst := analytics.NewAnalyst(sealedHTTPClient(t, dir, "analyst", serverID, serverID), url, key, analystID)
	spec := analytics.StudySpec{ID: "blood-pressure", OwnerPatterns: []string{"spiffe://example.org/ns/owners/sa/*"}, Dimension: 2, Ranges: []analytics.Range{{Min: 0, Max: 250}}}
	if err := analyst.CreateStudy(ctx, spec); err != nil {
		t.Fatal(err)
	}
	records := map[string][][]float64{
		"o1": {{120, 80}, {135, 85}, {110, 70}},
		"o2": {{140, 90}, {128, 82}},
	}
	owner := func(name, url string) *analytics.Owner {
		return analytics.NewOwner(sealedHTTPClient(t, dir, name, serverID, serverID), url, loadSource(t, filepath.Join(dir, name)), spiffeid.MatchID(analystSVID.ID))
	}
	for _, name := range []string{"o1", "o2"} {
		if _, err := owner(name, url).Submit(ctx, spec.ID, "batch-1", records[name]); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	// A retried submission (same owner, same idempotency key) counts once, and its
	// answer counts the owner's own submissions, never the study's.
	again, err := owner("o1", url).Submit(ctx, spec.ID, "batch-1", records["o1"])
	if err != nil || !again.Duplicate || again.Submissions != 1 {
		t.Fatalf("retry: %+v, %v; want a duplicate with 1 own submission", again, err)
	}
	// Authorization mistakes.
	if _, err := owner("intruder", url).Submit(ctx, spec.ID, "x", [][]float64{{1, 1}}); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("unknown owner: %v, want permission_denied", err)
	}
	if _, err := analyst.Close(ctx, spec.ID); err != nil {
		t.Fatal(err)
	}
	intruderKey, _ := he.NewClient(he.ParamsN13())
	if _, err := analytics.NewAnalyst(sealedHTTPClient(t, dir, "intruder", serverID, serverID), url, intruderKey, nil).Result(ctx, spec.ID); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("non-analyst fetch: %v, want permission_denied", err)
	}

	// Restart the container; its filesystem, and so the store, survives.
	stop := 10 * time.Second
	if err := c.Stop(ctx, &stop); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	url = "https://" + c.endpoint(t, "8443/tcp")
	analyst = analytics.NewAnalyst(sealedHTTPClient(t, dir, "analyst", serverID, serverID), url, key, analystID)
	var res *analytics.Result
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if res, err = analyst.Result(ctx, spec.ID); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("result after restart: %v", err)
	}
	if res.Submissions != 2 || res.Count != 5 {
		t.Fatalf("after restart: %d submissions, %d records; want 2 and 5", res.Submissions, res.Count)
	}
	var all [][]float64
	for _, r := range records {
		all = append(all, r...)
	}
	for i := range 2 {
		var sum, sq float64
		for _, r := range all {
			sum += r[i]
			sq += r[i] * r[i]
		}
		mean := sum / float64(len(all))
		variance := sq/float64(len(all)) - mean*mean
		if math.Abs(res.Mean[i]-mean) > 1e-3 || math.Abs(res.Variance[i]-variance) > 1e-1 {
			t.Fatalf("coordinate %d: mean %v variance %v, plaintext %v %v", i, res.Mean[i], res.Variance[i], mean, variance)
		}
	}
	// A submission after the restart is still counted once per idempotency key.
	again, err = owner("o2", url).Submit(ctx, spec.ID, "batch-1", records["o2"])
	if err != nil || !again.Duplicate {
		t.Fatalf("retry after restart: %+v, %v", again, err)
	}
}
