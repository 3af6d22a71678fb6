package analytics_test

import (
	"context"
	"math"
	"testing"

	"connectrpc.com/connect"

	"github.com/veilrpc/veil/services/analytics"
)

// sumsOf returns the per-coordinate sums of records.
func sumsOf(records [][]float64) []float64 {
	s := make([]float64, len(records[0]))
	for _, r := range records {
		for i, v := range r {
			s[i] += v
		}
	}
	return s
}

// recovers reports whether got - minus equals want to within 1e-3 in every coordinate:
// an analyst that can compute this has isolated one owner's sums.
func recovers(got, minus, want []float64) bool {
	for i := range want {
		if math.Abs(got[i]-minus[i]-want[i]) > 1e-3 {
			return false
		}
	}
	return true
}

// Review finding A (differencing with the analyst as an owner): a study whose owner
// patterns match the analyst's own ID (a trust-domain pattern, a documented form) let the
// analyst submit records it knows as one of the min_owners "distinct owners" and close
// with one real owner: the result minus its own sums was that owner's sums. The analyst
// now may not submit to its own study (permission_denied), so a close still needs
// min_owners owners other than the analyst.
func TestAttackAnalystAsOwner(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "self", OwnerPatterns: []string{"spiffe://example.org"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	known, victim := records(7, 10, 2), records(8, 12, 2)
	// The analyst's own owner client (it trusts its own signature).
	_, err := e.owner(t, analyst).Submit(ctx, "self", "k", known)
	wantCode(t, "the analyst submitting to its own study", err, connect.CodePermissionDenied)
	if _, err := e.owner(t, owners[0]).Submit(ctx, "self", "k", victim); err != nil {
		t.Fatal(err)
	}
	_, err = a.Close(ctx, "self")
	wantCode(t, "close with one owner besides the analyst", err, connect.CodeFailedPrecondition)
	if _, err := e.owner(t, owners[1]).Submit(ctx, "self", "k", records(9, 11, 2)); err != nil {
		t.Fatal(err)
	}
	res := closeAndResult(t, a, "self")
	if recovers(res.Sum, sumsOf(known), sumsOf(victim)) {
		t.Fatal("the analyst isolated one owner's sums")
	}
}

// Review finding B (differencing across studies): min_owners and the close protect one
// study's releases from each other, not two studies from each other. An analyst that
// opens two studies over the same owners, closes the first after three owners and the
// second after two of them, learns the third owner's sums as the difference, whenever
// owners submit the same records to every study they are asked to (as a periodic job
// would). Neither the service (it cannot see that two submissions hold the same records)
// nor an owner's client (it keeps no history) can tell. Without privacy the attack works,
// as docs/services.md "What each party learns" states; with differential privacy on the
// studies (an epsilon budget, Laplace noise added before release), the difference is off
// by noise of scale sensitivity/epsilon per coordinate (300 here), never the owner's sums.
func TestAttackDifferencingAcrossStudies(t *testing.T) {
	for _, tc := range []struct {
		name     string
		privacy  *analytics.Privacy
		recovers bool
	}{
		{"without privacy: the documented limit", nil, true},
		{"with differential privacy", &analytics.Privacy{Epsilon: 1, EpsilonPerRelease: 1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, key := setup(t, "")
			ctx := context.Background()
			a := e.analyst(t, analyst, key)
			for _, id := range []string{"big", "small"} {
				if err := a.CreateStudy(ctx, analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide, Privacy: tc.privacy}); err != nil {
					t.Fatal(err)
				}
			}
			data := [][][]float64{records(11, 10, 2), records(12, 14, 2), records(13, 9, 2)}
			for i, o := range owners {
				if _, err := e.owner(t, o).Submit(ctx, "big", "k", data[i]); err != nil {
					t.Fatal(err)
				}
			}
			for i, o := range owners[:2] {
				if _, err := e.owner(t, o).Submit(ctx, "small", "k", data[i]); err != nil {
					t.Fatal(err)
				}
			}
			big, small := closeAndResult(t, a, "big"), closeAndResult(t, a, "small")
			if got := recovers(big.Sum, small.Sum, sumsOf(data[2])); got != tc.recovers {
				t.Fatalf("the difference of two studies' results recovers the third owner's sums: %v, want %v (difference %v, sums %v)",
					got, tc.recovers, []float64{big.Sum[0] - small.Sum[0], big.Sum[1] - small.Sum[1]}, sumsOf(data[2]))
			}
		})
	}
}

// Holds (record-count overflow): N is the sum of the owners' self-reported counts, added
// without a check in the service; two counts of 2^63 would wrap N to 0 and make the
// server multiply by 1/N = +Inf for a reader without sums_only. The request's validation
// (count at most 10^12) refuses such a count before the service sees it, so N stays far
// from 2^64 for any number of submissions the owner caps allow.
func TestAttackCountOverflow(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "wrap", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	req := encryptedSubmission(t, key.PublicKey(), "wrap", "k", 1<<63, []float64{1, 2}, []float64{1, 4})
	_, err := e.raw(t, owners[0]).Submit(ctx, connect.NewRequest(req))
	wantCode(t, "a count of 2^63", err, connect.CodeInvalidArgument)
}

// Review finding D (an owner learned others' submissions; fixed): every Submit answer
// carried the study's submission count, a retry's too, so an owner that resubmitted under
// its idempotency key (acknowledged as a duplicate, never counted twice) polled how many
// other submissions the study had and when each arrived. Now the answer counts the
// caller's own submissions only.
func TestAttackOwnerPollsOthersSubmissions(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "poll", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	spy := e.owner(t, owners[0])
	mine := records(21, 5, 2)
	before, err := spy.Submit(ctx, "poll", "k", mine)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.owner(t, owners[1]).Submit(ctx, "poll", "k", records(22, 5, 2)); err != nil {
		t.Fatal(err)
	}
	after, err := spy.Submit(ctx, "poll", "k", mine) // a retry: not counted again
	if err != nil || !after.Duplicate {
		t.Fatalf("retry: %+v, %v", after, err)
	}
	if after.Submissions != before.Submissions {
		t.Fatalf("the owner's retry saw the count go from %d to %d: another owner submitted", before.Submissions, after.Submissions)
	}
}
