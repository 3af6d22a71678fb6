package analytics_test

import (
	"context"
	"math"
	"testing"

	"connectrpc.com/connect"

	"github.com/veilrpc/veil/services/analytics"
)

// TestPrivacyBudget: a study with differential privacy releases noisy sums, fresh
// noise each time, as many times as its budget allows, then refuses.
func TestPrivacyBudget(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const id = "private"
	// Range [0, 10], d = 1: the sum's sensitivity is 10; 0.5 per release over two
	// vectors: Laplace scale 10 / 0.25 = 40 on the sum.
	spec := analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1,
		Ranges: []analytics.Range{{Min: 0, Max: 10}}, Privacy: &analytics.Privacy{Epsilon: 1, EpsilonPerRelease: 0.5}}
	if err := a.CreateStudy(ctx, spec); err != nil {
		t.Fatal(err)
	}
	var sum float64
	for i, oid := range owners[:2] {
		recs := [][]float64{{float64(2 + i)}, {float64(5 + i)}}
		sum += recs[0][0] + recs[1][0]
		if _, err := e.owner(t, oid).Submit(ctx, id, "b", recs); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Close(ctx, id); err != nil {
		t.Fatal(err)
	}
	var sums []float64
	for range 2 {
		res, err := a.Result(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		sums = append(sums, res.Sum[0])
	}
	// Laplace(40) lands within 1e-3 of a given value with probability 2.5e-5: the
	// releases are noisy, and their noise is fresh.
	if math.Abs(sums[0]-sum) < 1e-3 || math.Abs(sums[1]-sum) < 1e-3 || math.Abs(sums[0]-sums[1]) < 1e-3 {
		t.Fatalf("released sums %v, plaintext %v: no noise", sums, sum)
	}
	t.Logf("plaintext sum %v, released %v", sum, sums)
	if _, err := a.Result(ctx, id); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("third release on a budget of two: %v", err)
	}
	// The budget survives a restart: the releases are recorded.
	e.srv.Stop()
	e.srv = serve(t, e.pki, dir)
	if _, err := e.analyst(t, analyst, key).Result(ctx, id); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("after a restart: %v", err)
	}
}

// TestPrivacyRefused: privacy settings that cannot hold are refused at creation.
func TestPrivacyRefused(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	base := analytics.StudySpec{OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1, Ranges: wide}
	for i, p := range []*analytics.Privacy{{Epsilon: 1, EpsilonPerRelease: 2}, {Epsilon: 0, EpsilonPerRelease: 0}} {
		spec := base
		spec.ID, spec.Privacy = "bad-privacy-"+string(rune('a'+i)), p
		if err := a.CreateStudy(ctx, spec); connect.CodeOf(err) != connect.CodeInvalidArgument {
			t.Errorf("privacy %+v: %v", p, err)
		}
	}
	spec := base
	spec.ID, spec.Privacy = "committee-privacy", &analytics.Privacy{Epsilon: 1, EpsilonPerRelease: 1}
	if err := a.CreateCommitteeStudy(ctx, spec, analytics.CommitteeSpec{Members: members[:1], Threshold: 1}); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("committee study with privacy: %v", err)
	}
}
