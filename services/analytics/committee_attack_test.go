package analytics_test

import (
	"context"
	"crypto/hpke"
	"crypto/sha256"
	"errors"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
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
	joins := func(who string) ([]*analyticsv1.CommitteeJoin, uint32) {
		t.Helper()
		res, err := e.raw(t, who).GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: id}))
		if err != nil {
			t.Fatal(err)
		}
		return res.Msg.GetJoins(), res.Msg.GetJoined()
	}
	// The last member, before it joins, and everyone else: the count, no join.
	for _, who := range []string{members[2], members[0], owners[0], analyst} {
		if got, n := joins(who); len(got) != 0 || n != 2 {
			t.Errorf("%s read %d joins (count %d) before every member joined: the last to join could cancel them", who, len(got), n)
		}
	}
	if _, err := e.member(t, members[2]).Join(ctx, id); err != nil {
		t.Fatal(err)
	}
	if got, _ := joins(owners[0]); len(got) != len(members) {
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

// A crafted stored record of a committee study (out-of-range indices, missing or
// mis-shaped vectors, garbage shares) never panics a restarting service: each is
// quarantined or ignored, and the study still answers and releases.
func TestCommitteeCraftedStoredRecords(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const id = "crafted-records"
	spec := analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1,
		Ranges: []analytics.Range{{Min: 0, Max: 10}}, HistogramEdges: []float64{0, 5, 10}, Privacy: &analytics.Privacy{Epsilon: 4, EpsilonPerRelease: 1}}
	ms := joinedCommittee(t, e, a, spec)
	setupAll(t, ms, id)
	for i, oid := range owners[:2] {
		if _, err := e.owner(t, oid).Submit(ctx, id, "b", [][]float64{{float64(1 + i)}, {float64(6 + i)}}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Close(ctx, id); err != nil {
		t.Fatal(err)
	}
	e.srv.Stop()
	store, err := analytics.NewDirStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	agg := &hev1.EncryptedVector{ParamId: string(he.ParamsN13().ID()), Length: 7, Ciphertexts: []*hev1.Ciphertext{{ParamId: string(he.ParamsN13().ID()), Level: 3, Scale: 1, C0: []byte{1, 2, 3}}}}
	crafted := map[string]*analyticsv1.StoredSubmission{
		analytics.JoinNameForTest(id, 0):      {Join: &analyticsv1.CommitteeJoin{Member: 0, PublicKeyShare: []byte{1}}},
		analytics.JoinNameForTest(id, 99):     {Join: &analyticsv1.CommitteeJoin{Member: 99}},
		analytics.ShamirNameForTest(id, 0, 0): {Shamir: &analyticsv1.SealedShamirShare{}},
		analytics.ShamirNameForTest(id, 7, 1): {Shamir: &analyticsv1.SealedShamirShare{From: 7, To: 1, Enc: []byte{1}}},
		// Round 1's noise: no vectors, then a mis-shaped one (the first stored stands).
		analytics.RoundNoiseNameForTest(id, 1):                   {RoundNoise: &analyticsv1.StoredRoundNoise{Round: 1}},
		analytics.RoundNoiseNameForTest(id, 2):                   {RoundNoise: &analyticsv1.StoredRoundNoise{Round: 2, Sum: agg, SumProducts: agg, Histogram: agg}},
		analytics.ReleaseShareNameForTest(id, 1, 0, nil):         {ReleaseShare: &analyticsv1.StoredReleaseShare{Member: 0, Request: &analyticsv1.SubmitReleaseShareRequest{Round: 1}}},
		analytics.ReleaseShareNameForTest(id, 1, 9, []int{9, 1}): {ReleaseShare: &analyticsv1.StoredReleaseShare{Member: 9, Request: &analyticsv1.SubmitReleaseShareRequest{Round: 1, Active: []uint32{9, 1}}}},
		analytics.ReleaseShareNameForTest(id, 1, 1, []int{1, 2}): {ReleaseShare: &analyticsv1.StoredReleaseShare{Member: 1, Request: &analyticsv1.SubmitReleaseShareRequest{Round: 1, Active: []uint32{1, 2}, Sum: []byte{0xff}}}},
	}
	for name, rec := range crafted {
		b, err := proto.Marshal(rec)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := store.AddSubmission(ctx, id, name, b); err != nil {
			t.Fatal(err)
		}
	}
	e.srv = serve(t, e.pki, dir)
	for i, m := range ms {
		m.Redirect(e.pki.Client(t, members[i], e.srv), e.srv.URL)
	}
	a = e.analyst(t, analyst, key)
	// The crafted round-1 noise carries no vectors: it was quarantined, so the round
	// has none and is refused; nothing panicked, and the committee is intact.
	res, err := e.raw(t, owners[0]).GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: id}))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Msg.GetJoins()) != len(members) {
		t.Fatalf("after the crafted records: %d joins", len(res.Msg.GetJoins()))
	}
	_, err = ms[0].Release(ctx, id, []int{1, 2})
	t.Logf("release over a quarantined round noise: %v", err)
	if err == nil {
		t.Fatal("a round whose stored noise was quarantined released (its noise would be redrawn)")
	}
	if _, err := a.Result(ctx, id); err == nil {
		t.Fatal("a result without release shares")
	}
}

// A member's signed join replayed into another study (by the member itself, which
// the server lets call) is refused: the join statement binds the study's statement
// and ID, so the signature does not verify there.
func TestCommitteeJoinReplayedAcrossStudies(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	for _, id := range []string{"join-a", "join-b"} {
		if err := a.CreateCommitteeStudy(ctx, analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1, Ranges: wide},
			analytics.CommitteeSpec{Members: members[:2], Threshold: 2}); err != nil {
			t.Fatal(err)
		}
	}
	for _, mid := range members[:2] {
		if _, err := e.member(t, mid).Join(ctx, "join-a"); err != nil {
			t.Fatal(err)
		}
	}
	res, err := e.raw(t, members[0]).GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: "join-a"}))
	if err != nil {
		t.Fatal(err)
	}
	for i, j := range res.Msg.GetJoins() {
		_, err := e.raw(t, members[i]).JoinCommittee(ctx, connect.NewRequest(&analyticsv1.JoinCommitteeRequest{StudyId: "join-b", Join: j}))
		codeOf(t, err, connect.CodeInvalidArgument, "a join replayed from another study")
	}
	// Member 2's join sent by member 1 (its own index is another): refused too.
	_, err = e.raw(t, members[0]).JoinCommittee(ctx, connect.NewRequest(&analyticsv1.JoinCommitteeRequest{StudyId: "join-a", Join: res.Msg.GetJoins()[1]}))
	codeOf(t, err, connect.CodeInvalidArgument, "another member's join")
}

// Committee review, finding 3 (Shamir shares are not authenticated): HPKE base mode
// hides a share from everyone but its recipient, but anyone holding the recipient's
// HPKE public key (in its join, served to every party) can seal a share under the same
// info. A server (or its store) that plants a share "from member 1" before member 1
// posts its own made member 3 add it: member 3's key share was then wrong, and every
// release it took part in garbage, with nothing to show who caused it. The sealed
// payload now carries the sender's signature (its X.509-SVID) over the study, both
// indices and the share, which the recipient checks against the member list.
func TestCommitteeForgedShamirShare(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const id = "forged-shamir"
	ms := joinedCommittee(t, e, a, analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1, Ranges: wide})
	res, err := e.raw(t, owners[0]).GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: id}))
	if err != nil {
		t.Fatal(err)
	}
	study := res.Msg.GetStudy()
	// The server's share "from member 1 to member 3": well formed, sealed to member 3.
	statement := sha256.Sum256([]byte("the server's own committee"))
	c, err := he.NewCommittee(he.ParamsN13(), statement[:], len(members), 2)
	if err != nil {
		t.Fatal(err)
	}
	fake, err := c.NewMember(1)
	if err != nil {
		t.Fatal(err)
	}
	sh, err := fake.ShamirShareFor(3)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := sh.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	pk, err := hpke.MLKEM768X25519().NewPublicKey(res.Msg.GetJoins()[2].GetHpkePublicKey())
	if err != nil {
		t.Fatal(err)
	}
	enc, sender, err := hpke.NewSender(pk, hpke.HKDFSHA256(), hpke.AES256GCM(), analytics.ShamirInfoForTest(study, 1, 3))
	if err != nil {
		t.Fatal(err)
	}
	ct, err := sender.Seal(nil, plain)
	if err != nil {
		t.Fatal(err)
	}
	b, err := proto.Marshal(&analyticsv1.StoredSubmission{Shamir: &analyticsv1.SealedShamirShare{From: 1, To: 3, Enc: enc, Ciphertext: ct}})
	if err != nil {
		t.Fatal(err)
	}
	store, err := analytics.NewDirStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.AddSubmission(ctx, id, analytics.ShamirNameForTest(id, 1, 3), b); err != nil {
		t.Fatal(err)
	}
	// Member 1's own share for member 3 then does not count (the first stored stands),
	// and member 3 must refuse the planted one.
	for pass := 0; pass < 3; pass++ {
		for i, m := range ms {
			err := m.Setup(ctx, id)
			if i == 2 && errors.Is(err, analytics.ErrUntrustedStudy) {
				t.Logf("member 3 refuses: %v", err)
				return
			}
			if err != nil && !errors.Is(err, analytics.ErrSetupPending) {
				t.Fatal(err)
			}
		}
	}
	t.Fatal("member 3 added a Shamir share member 1 never made")
}

// Committee review, finding 4 (unbounded release shares): the server kept (in memory
// and in its store) one release share per member per active set, and a member may
// name any active set that holds it: C(n-1, t-1) of them per round, each three
// vectors of ciphertext-sized shares, so one malicious member could fill the server's
// memory and disk (C(63, 31) ~ 9e17 sets at n = 64). A member may now send shares for
// at most 4 active sets a round (enough to retry
// around offline members); more is resource_exhausted, and nothing is stored.
func TestCommitteeReleaseSharesBounded(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const id = "many-active-sets"
	committee := []string{members[0], members[1], members[2], "spiffe://example.org/ns/bank/sa/delta", "spiffe://example.org/ns/bank/sa/epsilon", "spiffe://example.org/ns/bank/sa/zeta"}
	if err := a.CreateCommitteeStudy(ctx, analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1, Ranges: wide},
		analytics.CommitteeSpec{Members: committee, Threshold: 3}); err != nil {
		t.Fatal(err)
	}
	ms := make([]*analytics.Member, len(committee))
	for i, mid := range committee {
		ms[i] = e.member(t, mid)
		if _, err := ms[i].Join(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	setupAll(t, ms, id)
	for i, oid := range owners[:2] {
		if _, err := e.owner(t, oid).Submit(ctx, id, "b", records(uint64(90+i), 5, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Close(ctx, id); err != nil {
		t.Fatal(err)
	}
	// Member 1 names every active set that holds it: C(5, 2) = 10 of them.
	sent, refused := 0, 0
	for j := 2; j <= 6; j++ {
		for k := j + 1; k <= 6; k++ {
			_, err := ms[0].Release(ctx, id, []int{1, j, k})
			switch {
			case err == nil:
				sent++
			case connect.CodeOf(err) == connect.CodeResourceExhausted:
				refused++
			default:
				t.Fatalf("active set {1, %d, %d}: %v", j, k, err)
			}
		}
	}
	if sent > analytics.MaxActiveSetsPerMember || refused == 0 {
		t.Fatalf("one member's release shares for %d active sets kept in one round (%d refused)", sent, refused)
	}
	// Two others complete one of member 1's sets: the round still releases.
	for _, i := range []int{1, 2} {
		if _, err := ms[i].Release(ctx, id, []int{1, 2, 3}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Result(ctx, id); err != nil {
		t.Fatalf("a result after member 1's excess shares: %v", err)
	}
}

// The server relabels a sealed Shamir share (member 1's share for member 2 served as
// member 3's, before member 3 posts): the HPKE info binds both indices, so it does not
// open, and member 2 refuses it rather than adding member 1's polynomial twice.
func TestCommitteeRelabeledShamirShare(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const id = "relabeled-shamir"
	ms := joinedCommittee(t, e, a, analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1, Ranges: wide})
	if err := ms[0].Setup(ctx, id); !errors.Is(err, analytics.ErrSetupPending) {
		t.Fatalf("member 1's first setup step: %v", err)
	}
	res, err := e.raw(t, members[1]).GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: id}))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Msg.GetSharesForCaller()) != 1 {
		t.Fatalf("member 2 has %d shares, want member 1's", len(res.Msg.GetSharesForCaller()))
	}
	relabeled := proto.CloneOf(res.Msg.GetSharesForCaller()[0])
	relabeled.From = 3
	b, err := proto.Marshal(&analyticsv1.StoredSubmission{Shamir: relabeled})
	if err != nil {
		t.Fatal(err)
	}
	store, err := analytics.NewDirStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.AddSubmission(ctx, id, analytics.ShamirNameForTest(id, 3, 2), b); err != nil {
		t.Fatal(err)
	}
	// Refused by HPKE itself (the info names members 3 and 2), before any signature.
	if err := ms[1].Setup(ctx, id); !errors.Is(err, analytics.ErrUntrustedStudy) || !strings.Contains(err.Error(), "does not open") {
		t.Fatalf("member 2 took member 1's share relabeled as member 3's: %v", err)
	}
}

// A committee naming one member twice is refused at creation: the member would hold
// the first index only (its second could never join, and the study never start).
func TestCommitteeMemberNamedTwice(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	err := a.CreateCommitteeStudy(ctx, analytics.StudySpec{ID: "twice", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 1, Ranges: wide},
		analytics.CommitteeSpec{Members: []string{members[0], members[1], members[0]}, Threshold: 2})
	codeOf(t, err, connect.CodeInvalidArgument, "a member named twice")
}

// joinedCommittee creates spec as a study of the whole committee (t = 2) and has every
// member join it.
func joinedCommittee(t *testing.T, e *env, a *analytics.Analyst, spec analytics.StudySpec) []*analytics.Member {
	t.Helper()
	ctx := context.Background()
	if err := a.CreateCommitteeStudy(ctx, spec, analytics.CommitteeSpec{Members: members, Threshold: 2}); err != nil {
		t.Fatal(err)
	}
	ms := make([]*analytics.Member, len(members))
	for i, mid := range members {
		ms[i] = e.member(t, mid)
		if _, err := ms[i].Join(ctx, spec.ID); err != nil {
			t.Fatal(err)
		}
	}
	return ms
}
