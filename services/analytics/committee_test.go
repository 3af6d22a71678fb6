package analytics_test

import (
	"context"
	"errors"
	"testing"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/services/analytics"
)

var members = []string{
	"spiffe://example.org/ns/bank/sa/alpha",
	"spiffe://example.org/ns/clinic/sa/beta",
	"spiffe://example.org/ns/agency/sa/gamma",
}

// committeeErrorBound bounds |released - plaintext| for the mean and variance of the
// committee tests (values in [-50, 150], 270 records, N13): the members' smudging
// noise (SmudgingSecurityBits, sized for each ciphertext released) dominates, chiefly in the variance
// (second moment minus squared mean); measured 0.15 with the smudging sized for the
// release's two ciphertexts (0.064 sized for one), against 1e-6 for a single key.
const committeeErrorBound = 0.5

func (e *env) member(t testing.TB, id string) *analytics.Member {
	return analytics.NewMember(e.pki.Client(t, id, e.srv), e.srv.URL, e.pki.Identity(t, id), e.pki.Identity(t, id), spiffeid.MatchID(spiffeid.RequireFromString(analyst)))
}

// setupAll runs every member's Setup until all are ready; each pass lets every
// member act once, and a setup needs at most two (post, then collect).
func setupAll(t *testing.T, ms []*analytics.Member, study string) {
	t.Helper()
	ctx := context.Background()
	for pass := 0; pass < 3; pass++ {
		pending := 0
		for _, m := range ms {
			err := m.Setup(ctx, study)
			switch {
			case errors.Is(err, analytics.ErrSetupPending):
				pending++
			case err != nil:
				t.Fatal(err)
			}
		}
		if pending == 0 {
			return
		}
	}
	t.Fatal("committee setup did not complete in three passes")
}

func codeOf(t *testing.T, err error, want connect.Code, what string) {
	t.Helper()
	if connect.CodeOf(err) != want {
		t.Errorf("%s: got %v, want %v", what, err, want)
	}
}

// TestCommitteeStudy runs a 2-of-3 committee study end to end with a server restart
// in the middle of the setup (it resumes from the stored joins and sealed shares):
// one member alone releases nothing, two release a result equal to the plaintext
// statistics within CKKS and smudging precision, and only the reader gets it.
func TestCommitteeStudy(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const d = 3
	const id = "joint-risk"
	if err := a.CreateCommitteeStudy(ctx, analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: d, Ranges: wide},
		analytics.CommitteeSpec{Members: members, Threshold: 2}); err != nil {
		t.Fatal(err)
	}
	ms := make([]*analytics.Member, len(members))
	for i, mid := range members {
		ms[i] = e.member(t, mid)
		idx, err := ms[i].Join(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if idx != i+1 {
			t.Fatalf("member %s got index %d", mid, idx)
		}
	}
	// A second, identical join is accepted once; an outsider cannot join.
	if _, err := ms[0].Join(ctx, id); err != nil {
		t.Fatalf("repeated join: %v", err)
	}
	if _, err := e.member(t, outsider).Join(ctx, id); err == nil {
		t.Fatal("an outsider joined")
	}
	// Mid-setup: member 1 has posted its Shamir shares; then the server restarts.
	if err := ms[0].Setup(ctx, id); !errors.Is(err, analytics.ErrSetupPending) {
		t.Fatalf("first setup step: %v", err)
	}
	e.srv.Stop()
	e.srv = serve(t, e.pki, dir)
	for i, mid := range members {
		ms[i].Redirect(e.pki.Client(t, mid, e.srv), e.srv.URL)
	}
	a = e.analyst(t, analyst, key)
	setupAll(t, ms, id)

	var all [][]float64
	for i, oid := range owners {
		recs := records(uint64(40+i), 60+30*i, d)
		all = append(all, recs...)
		if _, err := e.owner(t, oid).Submit(ctx, id, "batch", recs); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Close(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Result(ctx, id); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("result before any release share: %v", err)
	}

	// One member alone (t-1 shares): nothing is released.
	r, err := ms[0].Release(ctx, id, []int{1, 2})
	if err != nil {
		t.Fatal(err)
	}
	if r.Ready || r.Shares != 1 {
		t.Fatalf("one member's share: %+v", r)
	}
	if _, err := a.Result(ctx, id); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("result with t-1 shares: %v", err)
	}
	// Refusals: non-members, wrong parameters, wrong round, wrong active set.
	t.Run("refusals", func(t *testing.T) {
		raw := e.raw(t, members[1])
		base := &analyticsv1.SubmitReleaseShareRequest{StudyId: id, Round: 1, ParamId: string(he.ParamsN13().ID()), Active: []uint32{1, 2}, Sum: []byte{1}, SumProducts: []byte{1}}
		req := func(edit func(*analyticsv1.SubmitReleaseShareRequest)) *connect.Request[analyticsv1.SubmitReleaseShareRequest] {
			m := proto.CloneOf(base)
			edit(m)
			return connect.NewRequest(m)
		}
		_, err := raw.SubmitReleaseShare(ctx, req(func(m *analyticsv1.SubmitReleaseShareRequest) { m.ParamId = "other-params" }))
		codeOf(t, err, connect.CodeInvalidArgument, "another parameter ID")
		_, err = raw.SubmitReleaseShare(ctx, req(func(m *analyticsv1.SubmitReleaseShareRequest) { m.Round = 2 }))
		codeOf(t, err, connect.CodeFailedPrecondition, "another release round")
		_, err = raw.SubmitReleaseShare(ctx, req(func(m *analyticsv1.SubmitReleaseShareRequest) { m.Active = []uint32{1, 3} }))
		codeOf(t, err, connect.CodeInvalidArgument, "an active set without the sender")
		_, err = raw.SubmitReleaseShare(ctx, req(func(m *analyticsv1.SubmitReleaseShareRequest) {}))
		codeOf(t, err, connect.CodeInvalidArgument, "a malformed share")
		for _, who := range []string{owners[0], analyst, outsider} {
			_, err = e.raw(t, who).SubmitReleaseShare(ctx, req(func(m *analyticsv1.SubmitReleaseShareRequest) {}))
			codeOf(t, err, connect.CodePermissionDenied, who+"'s release share")
			_, err = e.raw(t, who).GetAggregate(ctx, connect.NewRequest(&analyticsv1.GetAggregateRequest{StudyId: id}))
			codeOf(t, err, connect.CodePermissionDenied, who+" reading the aggregate")
		}
		// A member of this study is not one of another study.
		key2, err := he.NewClient(he.ParamsN13())
		if err != nil {
			t.Fatal(err)
		}
		if err := e.analyst(t, analyst, key2).CreateCommitteeStudy(ctx, analytics.StudySpec{ID: "other-study", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: d, Ranges: wide},
			analytics.CommitteeSpec{Members: []string{"spiffe://example.org/ns/bank/sa/delta"}, Threshold: 1}); err != nil {
			t.Fatal(err)
		}
		_, err = raw.SubmitReleaseShare(ctx, req(func(m *analyticsv1.SubmitReleaseShareRequest) { m.StudyId = "other-study" }))
		codeOf(t, err, connect.CodePermissionDenied, "a share for another study")
		// Members never see the result.
		_, err = raw.GetResult(ctx, connect.NewRequest(&analyticsv1.GetResultRequest{StudyId: id}))
		codeOf(t, err, connect.CodePermissionDenied, "a member reading the result")
	})

	// Member 3 is offline; member 2 completes the active set {1, 2}.
	if r, err = ms[1].Release(ctx, id, []int{1, 2}); err != nil {
		t.Fatal(err)
	}
	if !r.Ready || r.Shares != 2 {
		t.Fatalf("two members' shares: %+v", r)
	}
	res, err := a.Result(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	worst := checkWithin(t, res, all, len(owners), committeeErrorBound)
	t.Logf("2-of-3 committee release: max |error| %.3g", worst)
	// The release was round 1: the next result needs the committee again.
	if _, err := a.Result(ctx, id); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("second result without new release shares: %v", err)
	}
}

// TestCommitteeSubstitution: an owner recomputes the collective key from the
// members' signed shares and refuses a study whose served key, or any share, is not
// what the members signed.
func TestCommitteeSubstitution(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const id = "substitution"
	if err := a.CreateCommitteeStudy(ctx, analytics.StudySpec{ID: id, OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide},
		analytics.CommitteeSpec{Members: members[:2], Threshold: 2}); err != nil {
		t.Fatal(err)
	}
	for _, mid := range members[:2] {
		if _, err := e.member(t, mid).Join(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	res, err := e.raw(t, owners[0]).GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: id}))
	if err != nil {
		t.Fatal(err)
	}
	study, joins := res.Msg.GetStudy(), res.Msg.GetJoins()
	bundle := e.pki.Identity(t, owners[0])
	params := he.ParamsN13()
	if _, err := analytics.VerifyCommittee(params, study, joins, bundle); err != nil {
		t.Fatalf("honest committee: %v", err)
	}
	// The server serves its own key (it holds the secret).
	own, err := he.NewClient(params)
	if err != nil {
		t.Fatal(err)
	}
	ownMsg, err := he.MarshalPublicKey(own.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	swapped := proto.CloneOf(study)
	swapped.PublicKey = ownMsg
	if _, err := analytics.VerifyCommittee(params, swapped, joins, bundle); !errors.Is(err, analytics.ErrUntrustedStudy) {
		t.Errorf("substituted collective key: %v", err)
	}
	// The server replaces a member's share by one of its own committee's.
	statement := []byte("server's own committee")
	c, err := he.NewCommittee(params, statement, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	fake, err := c.NewMember(2)
	if err != nil {
		t.Fatal(err)
	}
	b, err := fake.PublicKeyShare().MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	forged := []*analyticsv1.CommitteeJoin{joins[0], {Member: 2, PublicKeyShare: b, HpkePublicKey: joins[1].GetHpkePublicKey(), Signature: joins[1].GetSignature()}}
	noKey := proto.CloneOf(study)
	noKey.PublicKey = nil
	if _, err := analytics.VerifyCommittee(params, noKey, forged, bundle); !errors.Is(err, analytics.ErrUntrustedStudy) {
		t.Errorf("substituted member share: %v", err)
	}
	// A member's share presented as another's, or a join left out.
	swappedIdx := []*analyticsv1.CommitteeJoin{joins[0], {Member: 2, PublicKeyShare: joins[0].GetPublicKeyShare(), HpkePublicKey: joins[0].GetHpkePublicKey(), Signature: joins[0].GetSignature()}}
	if _, err := analytics.VerifyCommittee(params, noKey, swappedIdx, bundle); !errors.Is(err, analytics.ErrUntrustedStudy) {
		t.Errorf("member 1's share as member 2's: %v", err)
	}
	if _, err := analytics.VerifyCommittee(params, noKey, joins[:1], bundle); !errors.Is(err, analytics.ErrUntrustedStudy) {
		t.Errorf("a join left out: %v", err)
	}
}
