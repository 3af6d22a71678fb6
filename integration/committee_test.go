package integration

import (
	"context"
	"errors"
	"math"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/testcontainers/testcontainers-go/wait"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
)

// TestCommitteeStudyContainers runs a 2-of-3 committee study with the server and
// each member in its own container (`veil analytics join`): two members join, the
// server restarts mid-setup and resumes from its stored joins, the third member joins,
// deals its key shares and is killed; the analyst closes, and the two remaining
// members release a result equal to the plaintext statistics within smudging error.
func TestCommitteeStudyContainers(t *testing.T) {
	const serverID = "spiffe://example.org/analytics"
	const study = "joint-risk"
	members := []string{"m1", "m2", "m3"}
	memberIDs := make([]string, len(members))
	for i, m := range members {
		memberIDs[i] = "spiffe://example.org/ns/members/sa/" + m
	}
	dir := sealedIdentities(t, append([]string{serverID, "spiffe://example.org/analyst",
		"spiffe://example.org/ns/owners/sa/o1", "spiffe://example.org/ns/owners/sa/o2"}, memberIDs...)...)
	nw := newNetwork(t)
	srv := startVeil(t, containerSpec{
		alias: "analytics", network: nw, port: "8443/tcp",
		args: []string{"/veil", "serve", "--identity", "/identity", "--listen", ":8443", "--service", "analytics",
			"--analytics-store", "/data/analytics", "--pq", "strict", "--pq-seal", "strict",
			"--allow", "spiffe://example.org/analyst", "--allow", "spiffe://example.org/ns/owners/sa/*", "--allow", "spiffe://example.org/ns/members/sa/*"},
		files: sealedFiles(dir, "analytics", nil),
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	url := "https://" + srv.endpoint(t, "8443/tcp")
	key, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	analystID := loadSource(t, filepath.Join(dir, "analyst"))
	analyst := analytics.NewAnalyst(sealedHTTPClient(t, dir, "analyst", serverID, serverID), url, key, analystID)
	spec := analytics.StudySpec{ID: study, OwnerPatterns: []string{"spiffe://example.org/ns/owners/sa/*"}, Dimension: 2, Ranges: []analytics.Range{{Min: 0, Max: 250}}}
	if err := analyst.CreateCommitteeStudy(ctx, spec, analytics.CommitteeSpec{Members: memberIDs, Threshold: 2}); err != nil {
		t.Fatal(err)
	}
	member := func(name string, extra ...string) *veilContainer {
		return startVeil(t, containerSpec{
			alias: name, network: nw, ready: "joined study",
			args: append([]string{"/veil", "analytics", "join", "--identity", "/identity", "--addr", "https://analytics:8443", "--server-id", serverID,
				"--study", study, "--analyst", "spiffe://example.org/analyst", "--poll", "200ms"}, extra...),
			files: sealedFiles(dir, name, nil),
		})
	}
	// joins returns how many joins the server holds (it serves none before all are
	// in, only their count); a restarted container's port may
	// accept before veil listens (its ready line is in the log from the first start),
	// so unavailable is retried.
	joins := func(url string) int {
		raw := analyticsv1connect.NewAnalyticsServiceClient(sealedHTTPClient(t, dir, "analyst", serverID, serverID), url, rpc.ClientOptions()...)
		for {
			res, err := raw.GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: study}))
			if err == nil {
				return int(res.Msg.GetJoined())
			}
			if connect.CodeOf(err) != connect.CodeUnavailable || ctx.Err() != nil {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	member("m1", "--active", "1,2")
	member("m2", "--active", "1,2")
	// Both joins are in once both containers logged them ("joined study").
	if n := joins(url); n != 2 {
		t.Fatalf("%d joins stored, want 2", n)
	}

	// Restart the server mid-setup: it must resume from the stored joins.
	stop := 10 * time.Second
	if err := srv.Stop(ctx, &stop); err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	url = "https://" + srv.endpoint(t, "8443/tcp")
	if n := joins(url); n != 2 {
		t.Fatalf("after the restart: %d joins, want the 2 stored", n)
	}
	// The third member joins, deals its shares, and is killed.
	m3 := member("m3", "--active", "2,3")
	if err := wait.ForLog("key shares ready").WithStartupTimeout(2*time.Minute).WaitUntilReady(ctx, m3); err != nil {
		t.Fatalf("third member's setup: %v", err)
	}
	kill := time.Duration(0)
	if err := m3.Stop(ctx, &kill); err != nil {
		t.Fatal(err)
	}

	analystSVID, err := analystID.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	// 100 records per owner: the smudging error on the sums (about 0.1) shrinks with
	// the count, and the variance's with it (2 x mean x the mean's error).
	records := map[string][][]float64{}
	for k, name := range []string{"o1", "o2"} {
		for i := range 100 {
			records[name] = append(records[name], []float64{100 + float64((i*37+k*11)%50), 60 + float64((i*13+k*7)%40)})
		}
	}
	analyst = analytics.NewAnalyst(sealedHTTPClient(t, dir, "analyst", serverID, serverID), url, key, analystID)
	for name, recs := range records {
		o := analytics.NewOwner(sealedHTTPClient(t, dir, name, serverID, serverID), url, loadSource(t, filepath.Join(dir, name)), spiffeid.MatchID(analystSVID.ID))
		if _, err := o.Submit(ctx, study, "batch-1", recs); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if _, err := analyst.Close(ctx, study); err != nil {
		t.Fatal(err)
	}
	// The members poll for the close and release; the result exists once both have.
	var res *analytics.Result
	for {
		if res, err = analyst.Result(ctx, study); connect.CodeOf(err) != connect.CodeFailedPrecondition {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no release: %v", errors.Join(ctx.Err(), err))
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	var all [][]float64
	for _, r := range records {
		all = append(all, r...)
	}
	if res.Count != uint64(len(all)) || res.Submissions != 2 {
		t.Fatalf("result of %d records, %d submissions", res.Count, res.Submissions)
	}
	for i := range 2 {
		var sum, sq float64
		for _, r := range all {
			sum += r[i]
			sq += r[i] * r[i]
		}
		mean := sum / float64(len(all))
		variance := sq/float64(len(all)) - mean*mean
		if math.Abs(res.Mean[i]-mean) > 0.05 || math.Abs(res.Variance[i]-variance) > 2 {
			t.Fatalf("coordinate %d: mean %v variance %v, plaintext %v %v", i, res.Mean[i], res.Variance[i], mean, variance)
		}
		t.Logf("coordinate %d: |mean error| %.3g, |variance error| %.3g", i, math.Abs(res.Mean[i]-mean), math.Abs(res.Variance[i]-variance))
	}
}
