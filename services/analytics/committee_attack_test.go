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
