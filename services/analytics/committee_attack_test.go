package analytics_test

import (
	"context"
	"testing"

	"connectrpc.com/connect"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/services/analytics"
)

// Committee review, finding 1 (rogue key): a member that read the others' public-key
// shares before fixing its own could join with its own share minus theirs; the
// collective key would then be its own, which it decrypts alone (the lattice side of
// the attack is he.TestCommitteeRogueKeyShare). GetCommittee served every join so far,
// so the last member to join had what it needed. No join is served, to anyone, before
// every member has joined (a member's join is final once stored).
func TestCommitteeJoinsHiddenUntilComplete(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const id = "rogue-key"
	if err := a.CreateCommitteeStudy(ctx, analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide},
		analytics.CommitteeSpec{Members: members, Threshold: 2}); err != nil {
		t.Fatal(err)
	}
	for _, mid := range members[:2] {
		if _, err := e.member(t, mid).Join(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	joins := func(who string) []*analyticsv1.CommitteeJoin {
		t.Helper()
		res, err := e.raw(t, who).GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: id}))
		if err != nil {
			t.Fatal(err)
		}
		return res.Msg.GetJoins()
	}
	// The last member, before it joins, and everyone else.
	for _, who := range []string{members[2], members[0], owners[0], analyst} {
		if got := joins(who); len(got) != 0 {
			t.Errorf("%s read %d joins before every member joined: the last to join could cancel them", who, len(got))
		}
	}
	if _, err := e.member(t, members[2]).Join(ctx, id); err != nil {
		t.Fatal(err)
	}
	if got := joins(owners[0]); len(got) != len(members) {
		t.Errorf("after every join, an owner reads %d joins, want %d", len(got), len(members))
	}
}

// Committee review, finding 2 (smudging sized for one decryption): a member smudged
// every release share for one query (he.FloodingSigma(bound, 30, 1)), yet each round
// releases two or three ciphertexts, and rounds are unbounded without privacy: the
// reader sees ever more smudged decryptions of the same aggregate under each member's
// key share, and averaging them erodes the 30 bits (Li-Micciancio). A member now sizes
// its smudging for every ciphertext it has released in the study, counted in its own
// process (a server cannot reset the count by naming an old round).
func TestCommitteeSmudgingCountsEveryRelease(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const id = "repeated-rounds"
	if err := a.CreateCommitteeStudy(ctx, analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1, Ranges: wide},
		analytics.CommitteeSpec{Members: members[:2], Threshold: 2}); err != nil {
		t.Fatal(err)
	}
	ms := []*analytics.Member{e.member(t, members[0]), e.member(t, members[1])}
	for _, m := range ms {
		if _, err := m.Join(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	setupAll(t, ms, id)
	var all [][]float64
	for i, oid := range owners[:2] {
		recs := records(uint64(70+i), 20, 1)
		all = append(all, recs...)
		if _, err := e.owner(t, oid).Submit(ctx, id, "b", recs); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Close(ctx, id); err != nil {
		t.Fatal(err)
	}
	// Each round releases the sum and the products: two ciphertexts.
	for round := 1; round <= 3; round++ {
		for _, m := range ms {
			if _, err := m.Release(ctx, id, []int{1, 2}); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		for i, m := range ms {
			if got := m.SmudgingQueries(id); got != 2*round {
				t.Fatalf("round %d: member %d sized its smudging for %d decryptions, has released %d", round, i+1, got, 2*round)
			}
		}
		res, err := a.Result(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		worst := checkWithin(t, res, all, 2, committeeErrorBound)
		t.Logf("round %d: max |error| %.3g", round, worst)
	}
}
