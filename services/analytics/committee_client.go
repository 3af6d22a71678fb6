package analytics

import (
	"bytes"
	"context"
	"crypto/hpke"
	"errors"
	"fmt"
	"slices"
	"sync"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
)

// SmudgingSecurityBits is the statistical security, against the reader and the
// server, of the smudging noise members add to their release shares:
// he.FloodingSigma of the aggregate's noise bound, for as many decryptions as the
// member has released ciphertexts in the study (docs/he.md).
const SmudgingSecurityBits = 30

// CommitteeSpec names a committee study's key holders.
type CommitteeSpec struct {
	Members   []string // SPIFFE IDs; member i (1-based) is Members[i-1]
	Threshold int      // members whose release shares a result needs
}

// CreateCommitteeStudy registers spec as a committee study, signed: no party holds
// its secret key; the analyst's key is only the reader key results are re-encrypted
// to once Threshold members release (Result decrypts them as for any study).
func (a *Analyst) CreateCommitteeStudy(ctx context.Context, spec StudySpec, committee CommitteeSpec) error {
	if committee.Threshold < 1 || committee.Threshold > len(committee.Members) {
		return fmt.Errorf("analytics: threshold %d of %d members", committee.Threshold, len(committee.Members))
	}
	return a.create(ctx, spec, &analyticsv1.Committee{Members: committee.Members, Threshold: uint32(committee.Threshold)})
}

// VerifyCommittee checks a committee study's joins and returns the collective key
// recomputed from them: one join per member, each signed (its chain verifying to
// bundle) by the SPIFFE ID the analyst's signed study names for that index, over the
// study, the index, the parameter ID and the share. When the study carries a public
// key (the server's collective key), it must be the recomputed one. Any failure
// wraps ErrUntrustedStudy. The caller has verified the study (VerifyStudy).
func VerifyCommittee(params *he.Parameters, study *analyticsv1.Study, joins []*analyticsv1.CommitteeJoin, bundle x509bundle.Source) (*he.PublicKey, error) {
	cm := study.GetCommittee()
	if cm == nil {
		return nil, fmt.Errorf("%w: study %q has no committee", ErrUntrustedStudy, study.GetStudyId())
	}
	if bundle == nil {
		return nil, fmt.Errorf("%w: no trust bundle to verify the members", ErrUntrustedStudy)
	}
	n, t := len(cm.GetMembers()), int(cm.GetThreshold())
	statement := committeeContext(study)
	c, err := he.NewCommittee(params, statement[:], n, t)
	if err != nil {
		return nil, err
	}
	if len(joins) != n {
		return nil, fmt.Errorf("%w: %d of %d members have joined", ErrUntrustedStudy, len(joins), n)
	}
	shares := make([]*he.PublicKeyShare, 0, n)
	for _, j := range joins {
		idx := int(j.GetMember())
		if idx < 1 || idx > n {
			return nil, fmt.Errorf("%w: join of unknown member %d", ErrUntrustedStudy, idx)
		}
		want := cm.GetMembers()[idx-1]
		stmt := joinStatement(statement, study.GetStudyId(), want, uint32(idx), string(params.ID()), j.GetPublicKeyShare(), j.GetHpkePublicKey())
		id, err := verifyStatement(j.GetSignature().GetChain(), j.GetSignature().GetSignature(), stmt, bundle)
		if err != nil {
			return nil, fmt.Errorf("member %d's share: %w", idx, err)
		}
		if id.String() != want {
			return nil, fmt.Errorf("%w: member %d's share is signed by %s, the study names %s", ErrUntrustedStudy, idx, id, want)
		}
		s, err := c.UnmarshalPublicKeyShare(idx, j.GetPublicKeyShare())
		if err != nil {
			return nil, fmt.Errorf("%w: member %d's share: %v", ErrUntrustedStudy, idx, err)
		}
		shares = append(shares, s)
	}
	pk, err := c.PublicKey(shares) // refuses repeated members
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUntrustedStudy, err)
	}
	if served := study.GetPublicKey(); served != nil {
		spk, err := he.UnmarshalPublicKey(params, served)
		if err != nil || !slices.Equal(spk.Fingerprint(), pk.Fingerprint()) {
			return nil, fmt.Errorf("%w: the server's collective key is not the one the members' signed shares make", ErrUntrustedStudy)
		}
	}
	return pk, nil
}

// Member is a committee member's client: it joins committee studies, deals and
// collects Shamir shares, and releases results towards the study's reader. Its secret
// key shares live in this process only (he.Member cannot be serialized): a member
// that restarts has left the committee, which the threshold tolerates.
type Member struct {
	svc      analyticsv1connect.AnalyticsServiceClient
	id       x509svid.Source
	bundle   x509bundle.Source
	analysts spiffeid.Matcher
	params   []*he.Parameters

	mu      sync.Mutex
	studies map[string]*memberStudy
}

type memberStudy struct {
	study *analyticsv1.Study
	c     *he.Committee
	m     *he.Member
	hpke  hpke.PrivateKey
	join  *analyticsv1.CommitteeJoin // signed once: a retry resends it unchanged
	// posted: this member's Shamir shares are stored; got: senders whose shares
	// were added.
	posted bool
	got    map[int]bool
	// queries counts the ciphertexts this member has released shares of (every round,
	// every active set): each is one more decryption of its key share the reader (and
	// the server with it) sees, and the smudging is sized for all of them.
	queries int
}

// NewMember returns a member client with identity id, verifying studies signed by
// an analyst analysts accepts and the other members' joins against bundle.
func NewMember(hc connect.HTTPClient, baseURL string, id x509svid.Source, bundle x509bundle.Source, analysts spiffeid.Matcher, opts ...connect.ClientOption) *Member {
	return &Member{svc: newServiceClient(hc, baseURL, opts), id: id, bundle: bundle, analysts: analysts, params: he.Presets(), studies: map[string]*memberStudy{}}
}

// Join fetches the study, verifies the analyst's signature, draws this member's key
// share and HPKE key, and uploads its signed public-key share. It returns this
// member's index.
func (m *Member) Join(ctx context.Context, studyID string) (int, error) {
	svid, err := m.id.GetX509SVID()
	if err != nil {
		return 0, fmt.Errorf("analytics: member identity: %w", err)
	}
	res, err := m.svc.GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: studyID}))
	if err != nil {
		return 0, err
	}
	study := res.Msg.GetStudy()
	if study.GetStudyId() != studyID {
		return 0, fmt.Errorf("%w: asked for study %q, got %q", ErrUntrustedStudy, studyID, study.GetStudyId())
	}
	if err := VerifyStudy(study, m.bundle, m.analysts); err != nil {
		return 0, err
	}
	cm := study.GetCommittee()
	idx := slices.Index(cm.GetMembers(), svid.ID.String()) + 1
	if idx == 0 {
		return 0, fmt.Errorf("analytics: %s is not a member of study %q", svid.ID, studyID)
	}
	var params *he.Parameters
	for _, p := range m.params {
		if string(p.ID()) == cm.GetReaderKey().GetParamId() {
			params = p
		}
	}
	if params == nil {
		return 0, fmt.Errorf("analytics: study %q uses unknown parameters %s", studyID, cm.GetReaderKey().GetParamId())
	}
	m.mu.Lock()
	ms := m.studies[studyID]
	m.mu.Unlock()
	if ms == nil {
		statement := committeeContext(study)
		c, err := he.NewCommittee(params, statement[:], len(cm.GetMembers()), int(cm.GetThreshold()))
		if err != nil {
			return 0, err
		}
		ms = &memberStudy{study: study, c: c, got: map[int]bool{}}
		if ms.m, err = c.NewMember(idx); err != nil {
			return 0, err
		}
		if ms.hpke, err = shamirKEM().GenerateKey(); err != nil {
			return 0, fmt.Errorf("analytics: HPKE key: %w", err)
		}
		m.mu.Lock()
		m.studies[studyID] = ms
		m.mu.Unlock()
	}
	if ms.join == nil {
		share, err := ms.m.PublicKeyShare().MarshalBinary()
		if err != nil {
			return 0, err
		}
		hpk := ms.hpke.PublicKey().Bytes()
		statement := committeeContext(study)
		chain, sig, err := signStatement(joinStatement(statement, studyID, svid.ID.String(), uint32(idx), string(params.ID()), share, hpk), svid)
		if err != nil {
			return 0, err
		}
		ms.join = &analyticsv1.CommitteeJoin{PublicKeyShare: share, HpkePublicKey: hpk, Signature: &analyticsv1.MemberSignature{Chain: chain, Signature: sig}}
	}
	if _, err := m.svc.JoinCommittee(ctx, connect.NewRequest(&analyticsv1.JoinCommitteeRequest{StudyId: studyID, Join: ms.join})); err != nil {
		return 0, err
	}
	return idx, nil
}

// ErrSetupPending is returned by Setup while other members have not done their part
// (joined, or posted their Shamir shares); call it again later.
var ErrSetupPending = errors.New("analytics: committee setup waits for other members")

// Setup advances this member's setup of a joined study: once every member has joined
// (and their joins verify), it seals its Shamir shares to the others and posts them,
// then opens and adds the shares sealed to it. It returns nil once the member can
// release, ErrSetupPending (wrapped) while others lag.
func (m *Member) Setup(ctx context.Context, studyID string) error {
	m.mu.Lock()
	ms := m.studies[studyID]
	m.mu.Unlock()
	if ms == nil {
		return fmt.Errorf("analytics: this member has not joined study %q", studyID)
	}
	n, t := ms.c.Size(), ms.c.Threshold()
	if t == n {
		return nil // n-out-of-n: each member's own share is its additive share
	}
	res, err := m.svc.GetCommittee(ctx, connect.NewRequest(&analyticsv1.GetCommitteeRequest{StudyId: studyID}))
	if err != nil {
		return err
	}
	joins := res.Msg.GetJoins()
	if len(joins) < n {
		return fmt.Errorf("%w: %d of %d members joined", ErrSetupPending, res.Msg.GetJoined(), n)
	}
	// The joins must verify before this member seals a secret to their HPKE keys: a
	// server that substituted a member's key would otherwise read its share.
	if !bytes.Equal(studyStatement(res.Msg.GetStudy()), studyStatement(ms.study)) {
		return fmt.Errorf("%w: the server answered another version of study %q", ErrUntrustedStudy, studyID)
	}
	if _, err := VerifyCommittee(ms.c.Params(), res.Msg.GetStudy(), joins, m.bundle); err != nil {
		return err
	}
	statement := committeeContext(ms.study)
	me := ms.m.Index()
	if !ms.posted {
		svid, err := m.id.GetX509SVID()
		if err != nil {
			return fmt.Errorf("analytics: member identity: %w", err)
		}
		req := &analyticsv1.PostShamirSharesRequest{StudyId: studyID}
		for _, j := range joins {
			to := int(j.GetMember())
			if to == me {
				continue
			}
			pk, err := shamirKEM().NewPublicKey(j.GetHpkePublicKey())
			if err != nil {
				return fmt.Errorf("%w: member %d's HPKE key: %v", ErrUntrustedStudy, to, err)
			}
			sh, err := ms.m.ShamirShareFor(to)
			if err != nil {
				return err
			}
			share, err := sh.MarshalBinary()
			if err != nil {
				return err
			}
			chain, sig, err := signStatement(shamirSignedStatement(statement, me, to, share), svid)
			if err != nil {
				return err
			}
			b := shamirPayload(share, sig, chain)
			enc, sender, err := hpke.NewSender(pk, shamirKDF(), shamirAEAD(), shamirInfo(statement, me, to))
			if err != nil {
				return fmt.Errorf("analytics: HPKE: %w", err)
			}
			ct, err := sender.Seal(nil, b)
			if err != nil {
				return fmt.Errorf("analytics: HPKE: %w", err)
			}
			req.Shares = append(req.Shares, &analyticsv1.SealedShamirShare{To: uint32(to), Enc: enc, Ciphertext: ct})
		}
		if _, err := m.svc.PostShamirShares(ctx, connect.NewRequest(req)); err != nil {
			return err
		}
		own, err := ms.m.ShamirShareFor(me)
		if err != nil {
			return err
		}
		if err := ms.m.AddShamirShare(own); err != nil {
			return err
		}
		ms.posted, ms.got[me] = true, true
	}
	for _, sh := range res.Msg.GetSharesForCaller() {
		from := int(sh.GetFrom())
		if ms.got[from] || sh.GetTo() != uint32(me) {
			continue
		}
		if from < 1 || from > n {
			return fmt.Errorf("%w: a Shamir share from unknown member %d", ErrUntrustedStudy, from)
		}
		r, err := hpke.NewRecipient(sh.GetEnc(), ms.hpke, shamirKDF(), shamirAEAD(), shamirInfo(statement, from, me))
		if err != nil {
			return fmt.Errorf("%w: Shamir share from member %d: %v", ErrUntrustedStudy, from, err)
		}
		b, err := r.Open(nil, sh.GetCiphertext())
		if err != nil {
			return fmt.Errorf("%w: Shamir share from member %d does not open", ErrUntrustedStudy, from)
		}
		share, sig, chain, err := parseShamirPayload(b)
		if err != nil {
			return fmt.Errorf("analytics: Shamir share from member %d: %w", from, err)
		}
		// Sealed by anyone with this member's HPKE key: it counts only if member from
		// signed it.
		signer, err := verifyStatement(chain, sig, shamirSignedStatement(statement, from, me, share), m.bundle)
		if err != nil {
			return fmt.Errorf("analytics: Shamir share from member %d: %w", from, err)
		}
		if signer.String() != ms.study.GetCommittee().GetMembers()[from-1] {
			return fmt.Errorf("%w: the Shamir share from member %d is signed by %s", ErrUntrustedStudy, from, signer)
		}
		s, err := ms.c.UnmarshalShamirShare(from, me, share)
		if err != nil {
			return err
		}
		if err := ms.m.AddShamirShare(s); err != nil {
			return err
		}
		ms.got[from] = true
	}
	if len(ms.got) < n {
		return fmt.Errorf("%w: Shamir shares from %d of %d members", ErrSetupPending, len(ms.got), n)
	}
	return nil
}

// ErrStudyOpen is returned (wrapped, with the server's failed_precondition) by
// Release while the study is not closed with submissions: call it again later.
var ErrStudyOpen = errors.New("analytics: the study is not closed yet")

// Released is the server's answer to a release share.
type Released struct {
	Round  uint64 // the release round the share was for
	Shares int    // shares of this active set so far
	Ready  bool   // the reader can fetch the result
}

// Release fetches the closed study's aggregate (under the collective key: this
// member cannot decrypt it, and never sees the result) and sends its
// public-key-switching shares towards the study's reader key, for active (exactly
// threshold member indices, this member's included), smudged for
// SmudgingSecurityBits.
func (m *Member) Release(ctx context.Context, studyID string, active []int) (Released, error) {
	m.mu.Lock()
	ms := m.studies[studyID]
	m.mu.Unlock()
	if ms == nil {
		return Released{}, fmt.Errorf("analytics: this member has not joined study %q", studyID)
	}
	params := ms.c.Params()
	reader, err := he.UnmarshalPublicKey(params, ms.study.GetCommittee().GetReaderKey())
	if err != nil {
		return Released{}, err
	}
	agg, err := m.svc.GetAggregate(ctx, connect.NewRequest(&analyticsv1.GetAggregateRequest{StudyId: studyID}))
	if connect.CodeOf(err) == connect.CodeFailedPrecondition {
		return Released{}, fmt.Errorf("%w: %w", ErrStudyOpen, err)
	}
	if err != nil {
		return Released{}, err
	}
	req := &analyticsv1.SubmitReleaseShareRequest{StudyId: studyID, Round: agg.Msg.GetRound(), ParamId: string(params.ID())}
	for _, a := range active {
		req.Active = append(req.Active, uint32(a))
	}
	type part struct {
		v   *he.Vector
		dst *[]byte
	}
	var parts []part
	cts := 0
	for _, p := range []struct {
		m   *hev1.EncryptedVector
		dst *[]byte
	}{{agg.Msg.GetSum(), &req.Sum}, {agg.Msg.GetSumProducts(), &req.SumProducts}, {agg.Msg.GetHistogram(), &req.Histogram}} {
		if p.m == nil && p.dst == &req.Histogram {
			continue
		}
		v, err := he.UnmarshalVector(params, p.m)
		if err != nil {
			return Released{}, err
		}
		parts = append(parts, part{v, p.dst})
		cts += v.Ciphertexts()
	}
	// Every ciphertext released is one more decryption of this member's key share:
	// the smudging is sized for all this member has released in the study (Li,
	// Micciancio, Schultz and Sorrell: queries decryptions), whatever round the
	// server names, so that repeated rounds cannot average it away.
	m.mu.Lock()
	ms.queries += cts
	queries := ms.queries
	m.mu.Unlock()
	fresh := int(agg.Msg.GetSubmissions())
	if ms.study.GetPrivacy() != nil {
		fresh++ // the round's noise, a fresh encryption under the collective key
	}
	sigma := he.FloodingSigma(he.SumNoiseBound(he.FreshNoiseBound(params), fresh), SmudgingSecurityBits, queries)
	for _, p := range parts {
		rs, err := ms.m.ReleaseShare(active, reader, p.v, sigma)
		if err != nil {
			return Released{}, err
		}
		if *p.dst, err = rs.MarshalBinary(); err != nil {
			return Released{}, err
		}
	}
	res, err := m.svc.SubmitReleaseShare(ctx, connect.NewRequest(req))
	if err != nil {
		return Released{}, err
	}
	return Released{Round: req.GetRound(), Shares: int(res.Msg.GetShares()), Ready: res.Msg.GetReady()}, nil
}
