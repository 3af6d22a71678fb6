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
}

// TestCommitteePrivacy: a committee study with privacy releases noisy sums; the noise
// of a round is drawn once and stored, so that members' shares made before and after a
// server restart combine; the budget ends the rounds.
func TestCommitteePrivacy(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const id = "private-committee"
	spec := analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1,
		Ranges: []analytics.Range{{Min: 0, Max: 10}}, Privacy: &analytics.Privacy{Epsilon: 1, EpsilonPerRelease: 0.5}}
	if err := a.CreateCommitteeStudy(ctx, spec, analytics.CommitteeSpec{Members: members[:2], Threshold: 2}); err != nil {
		t.Fatal(err)
	}
	ms := []*analytics.Member{e.member(t, members[0]), e.member(t, members[1])}
	for _, m := range ms {
		if _, err := m.Join(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	setupAll(t, ms, id)
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
	for round := 1; round <= 2; round++ {
		if _, err := ms[0].Release(ctx, id, []int{1, 2}); err != nil {
			t.Fatal(err)
		}
		if round == 1 { // the round's noise must survive a restart
			e.srv.Stop()
			e.srv = serve(t, e.pki, dir)
			for i, m := range ms {
				m.Redirect(e.pki.Client(t, members[i], e.srv), e.srv.URL)
			}
			a = e.analyst(t, analyst, key)
		}
		if r, err := ms[1].Release(ctx, id, []int{1, 2}); err != nil || !r.Ready {
			t.Fatalf("round %d: %+v %v", round, r, err)
		}
		res, err := a.Result(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		sums = append(sums, res.Sum[0])
	}
	// Laplace of scale 40 on the sum: within 1e-3 of the plaintext with probability
	// 2.5e-5, beyond 800 with probability 2e-9; shares of two different noisy
	// aggregates would combine into garbage far beyond.
	for _, s := range sums {
		if d := math.Abs(s - sum); d < 1e-3 || d > 800 {
			t.Fatalf("released sums %v, plaintext %v", sums, sum)
		}
	}
	t.Logf("plaintext sum %v, released %v", sum, sums)
	if _, err := ms[0].Release(ctx, id, []int{1, 2}); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("a third round on a budget of two: %v", err)
	}
}
