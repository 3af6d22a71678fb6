package he

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"slices"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/mhe"
	"github.com/tuneinsight/lattigo/v5/ring"
	"github.com/tuneinsight/lattigo/v5/utils/sampling"
)

// Committee is a t-out-of-n threshold CKKS key held by n members, none of whom holds
// the secret: the collective public key is the sum of the members' public-key shares
// (lattigo mhe), each member Shamir-shares its secret to the others, and any t of
// them re-encrypt a result to a reader's public key (public-key switching) without
// ever decrypting it. Every share is bound to the committee's context (for example a
// study ID and the parameter ID): the common reference polynomial is derived from it,
// so shares made for another context do not combine. See docs/he.md.
type Committee struct {
	params    *Parameters
	context   []byte
	n, t      int
	crp       mhe.PublicKeyGenCRP
	ckg       mhe.PublicKeyGenProtocol
	threshold bool
}

// NewCommittee returns the committee of n members (1..n), threshold t (1 <= t <= n),
// bound to context.
func NewCommittee(params *Parameters, context []byte, n, t int) (c *Committee, err error) {
	defer recoverInto(&err, "committee")
	if params == nil || n < 1 || n > 64 || t < 1 || t > n {
		return nil, invalidf("committee of %d members with threshold %d: need 1 <= t <= n <= 64", n, t)
	}
	h := sha256.New()
	h.Write([]byte("veil-he-committee-crs-v1\x00"))
	h.Write([]byte(params.id))
	h.Write(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, uint32(n)), uint32(t)))
	h.Write(context)
	prng, err := sampling.NewKeyedPRNG(h.Sum(nil))
	if err != nil {
		return nil, internalf("committee CRS")
	}
	c = &Committee{params: params, context: slices.Clone(context), n: n, t: t, ckg: mhe.NewPublicKeyGenProtocol(params.p), threshold: t < n}
	c.crp = c.ckg.SampleCRP(prng)
	return c, nil
}

// Threshold returns t.
func (c *Committee) Threshold() int { return c.t }

// Params returns the committee's parameters.
func (c *Committee) Params() *Parameters { return c.params }

// Size returns n.
func (c *Committee) Size() int { return c.n }

// Member is one committee member's secret state. It never leaves the member's
// process: nothing in it can be serialized.
type Member struct {
	c     *Committee
	index int
	sk    *rlwe.SecretKey
	poly  mhe.ShamirPolynomial
	tsk   *mhe.ShamirSecretShare
	got   map[int]bool
}

// NewMember generates member index's (1..n) secret share of the committee key.
func (c *Committee) NewMember(index int) (m *Member, err error) {
	defer recoverInto(&err, "committee member")
	if index < 1 || index > c.n {
		return nil, invalidf("member %d outside 1..%d", index, c.n)
	}
	m = &Member{c: c, index: index, sk: rlwe.NewKeyGenerator(c.params.p).GenSecretKeyNew(), got: map[int]bool{}}
	if c.threshold {
		if m.poly, err = mhe.NewThresholdizer(c.params.p).GenShamirPolynomial(c.t, m.sk); err != nil {
			return nil, internalf("shamir polynomial")
		}
		tsk := mhe.NewThresholdizer(c.params.p).AllocateThresholdSecretShare()
		m.tsk = &tsk
	}
	return m, nil
}

// Index returns the member's index.
func (m *Member) Index() int { return m.index }

// PublicKeyShare is one member's share of the collective public key.
type PublicKeyShare struct {
	Member int
	share  mhe.PublicKeyGenShare
}

// PublicKeyShare returns the member's public-key share (public: it goes to the server
// and, signed by the member, to every owner).
func (m *Member) PublicKeyShare() *PublicKeyShare {
	s := m.c.ckg.AllocateShare()
	m.c.ckg.GenShare(m.sk, m.c.crp, &s)
	return &PublicKeyShare{Member: m.index, share: s}
}

// MarshalBinary encodes the share.
func (s *PublicKeyShare) MarshalBinary() ([]byte, error) { return s.share.MarshalBinary() }

// UnmarshalPublicKeyShare decodes an untrusted share of member.
func (c *Committee) UnmarshalPublicKeyShare(member int, b []byte) (s *PublicKeyShare, err error) {
	defer recoverInto(&err, "decode public-key share")
	want := c.ckg.AllocateShare()
	if member < 1 || member > c.n || len(b) != want.BinarySize() {
		return nil, invalidf("public-key share of member %d: %d bytes, want %d", member, len(b), want.BinarySize())
	}
	if err := want.UnmarshalBinary(b); err != nil {
		return nil, invalidf("public-key share: %v", err)
	}
	if !reduced(want.Value.Q, c.params.p.Q()) || !reduced(want.Value.P, c.params.p.P()) {
		return nil, invalidf("public-key share: coefficient not reduced")
	}
	return &PublicKeyShare{Member: member, share: want}, nil
}

// PublicKey aggregates the shares of all n members, one each, into the collective
// public key.
func (c *Committee) PublicKey(shares []*PublicKeyShare) (pk *PublicKey, err error) {
	defer recoverInto(&err, "collective public key")
	if err := c.distinct(len(shares), func(i int) int { return shares[i].Member }); err != nil {
		return nil, err
	}
	if len(shares) != c.n {
		return nil, preconditionf("collective public key needs all %d members' shares, have %d", c.n, len(shares))
	}
	agg := c.ckg.AllocateShare()
	for _, s := range shares {
		c.ckg.AggregateShares(agg, s.share, &agg)
	}
	out := rlwe.NewPublicKey(c.params.p)
	c.ckg.GenPublicKey(agg, c.crp, out)
	return newPublicKey(c.params, out), nil
}

// distinct checks that n shares come from distinct members in 1..n.
func (c *Committee) distinct(n int, member func(int) int) error {
	seen := map[int]bool{}
	for i := range n {
		m := member(i)
		if m < 1 || m > c.n || seen[m] {
			return invalidf("share of member %d: unknown or repeated", m)
		}
		seen[m] = true
	}
	return nil
}

// ShamirShare is a member's secret share for another member (threshold committees):
// it must travel only sealed to its recipient.
type ShamirShare struct {
	From, To int
	share    mhe.ShamirSecretShare
}

// ShamirShareFor returns the member's secret share for member to (1..n, itself
// included). Only for t < n.
func (m *Member) ShamirShareFor(to int) (s *ShamirShare, err error) {
	defer recoverInto(&err, "shamir share")
	if !m.c.threshold {
		return nil, preconditionf("an n-out-of-n committee has no Shamir shares")
	}
	if to < 1 || to > m.c.n {
		return nil, invalidf("member %d outside 1..%d", to, m.c.n)
	}
	thr := mhe.NewThresholdizer(m.c.params.p)
	out := thr.AllocateThresholdSecretShare()
	thr.GenShamirSecretShare(mhe.ShamirPublicPoint(to), m.poly, &out)
	return &ShamirShare{From: m.index, To: to, share: out}, nil
}

// AddShamirShare adds the share another member made for this one; a member is ready
// to release once it has one from every member (itself included).
func (m *Member) AddShamirShare(s *ShamirShare) (err error) {
	defer recoverInto(&err, "add shamir share")
	if !m.c.threshold || s == nil || s.To != m.index || s.From < 1 || s.From > m.c.n || m.got[s.From] {
		return invalidf("shamir share not for member %d, unknown or repeated", m.index)
	}
	thr := mhe.NewThresholdizer(m.c.params.p)
	if err := thr.AggregateShares(*m.tsk, s.share, m.tsk); err != nil {
		return internalf("aggregate shamir shares")
	}
	m.got[s.From] = true
	return nil
}

// ReleaseShare is one member's public-key-switching share of a vector towards a
// reader's public key, computed for a given set of active members.
type ReleaseShare struct {
	Member int
	Active []int
	shares []mhe.PublicKeySwitchShare
	// reader is the fingerprint of the reader's key when this process made the
	// share; empty for a decoded one (it does not travel).
	reader []byte
}

// ReleaseShare returns the member's share re-encrypting v to reader, for the active
// members (exactly t of them, this one included), with smudging noise of standard
// deviation sigma (FloodingSigma of v's noise bound for the security level wanted:
// it hides this member's secret share from the reader and the server).
func (m *Member) ReleaseShare(active []int, reader *PublicKey, v *Vector, sigma float64) (rs *ReleaseShare, err error) {
	defer recoverInto(&err, "release share")
	c := m.c
	if reader == nil || reader.params.id != c.params.id || v == nil || v.params.id != c.params.id {
		return nil, preconditionf("release share: vector or reader key under other parameters")
	}
	if len(active) != c.t || !slices.Contains(active, m.index) {
		return nil, invalidf("release share: the active set must hold exactly %d members, this one included", c.t)
	}
	if err := c.distinct(len(active), func(i int) int { return active[i] }); err != nil {
		return nil, err
	}
	if !(sigma >= 1) || !c.params.floodFits(v.Level(), sigma) {
		return nil, invalidf("release share: smudging sigma %g out of range for level %d", sigma, v.Level())
	}
	sk := m.sk
	if c.threshold {
		if len(m.got) != c.n {
			return nil, preconditionf("member %d holds %d of %d Shamir shares", m.index, len(m.got), c.n)
		}
		points := make([]mhe.ShamirPublicPoint, len(active))
		for i, a := range active {
			points[i] = mhe.ShamirPublicPoint(a)
		}
		cmb := mhe.NewCombiner(*c.params.p.GetRLWEParameters(), mhe.ShamirPublicPoint(m.index), points, c.t)
		sk = rlwe.NewSecretKey(c.params.p)
		if err := cmb.GenAdditiveShare(points, mhe.ShamirPublicPoint(m.index), *m.tsk, sk); err != nil {
			return nil, internalf("additive share")
		}
	}
	pcks, err := mhe.NewPublicKeySwitchProtocol(c.params.p, ring.DiscreteGaussian{Sigma: sigma, Bound: noiseTail * sigma})
	if err != nil {
		return nil, internalf("public-key switch: %v", err)
	}
	rs = &ReleaseShare{Member: m.index, Active: slices.Clone(active), reader: reader.fp}
	for _, ct := range v.cts {
		s := pcks.AllocateShare(ct.Level())
		pcks.GenShare(sk, reader.pk, ct, &s)
		rs.shares = append(rs.shares, s)
	}
	return rs, nil
}

// MarshalBinary encodes the share's ciphertext parts (Member and Active travel in the
// enclosing message).
func (s *ReleaseShare) MarshalBinary() ([]byte, error) {
	var buf bytes.Buffer
	for _, p := range s.shares {
		if _, err := p.WriteTo(&buf); err != nil {
			return nil, internalf("encode release share")
		}
	}
	return buf.Bytes(), nil
}

// UnmarshalReleaseShare decodes an untrusted release share of member, for active, of
// a vector shaped like v.
func (c *Committee) UnmarshalReleaseShare(member int, active []int, v *Vector, b []byte) (rs *ReleaseShare, err error) {
	defer recoverInto(&err, "decode release share")
	if v == nil || v.params.id != c.params.id {
		return nil, preconditionf("release share: vector under other parameters")
	}
	pcks, err := mhe.NewPublicKeySwitchProtocol(c.params.p, ring.DiscreteGaussian{Sigma: 1, Bound: 8})
	if err != nil {
		return nil, internalf("public-key switch")
	}
	rs = &ReleaseShare{Member: member, Active: slices.Clone(active)}
	r := bytes.NewReader(b)
	for _, ct := range v.cts {
		s := pcks.AllocateShare(ct.Level())
		size := s.BinarySize()
		part := make([]byte, size)
		if n, _ := r.Read(part); n != size {
			return nil, invalidf("release share truncated")
		}
		if err := s.UnmarshalBinary(part); err != nil || s.Level() != ct.Level() {
			return nil, invalidf("release share malformed")
		}
		if !reduced(s.Value[0], c.params.p.Q()) || !reduced(s.Value[1], c.params.p.Q()) {
			return nil, invalidf("release share: coefficient not reduced")
		}
		rs.shares = append(rs.shares, s)
	}
	if r.Len() != 0 {
		return nil, invalidf("release share has %d trailing bytes", r.Len())
	}
	return rs, nil
}

// Release combines the release shares of exactly the t active members (each made for
// that same active set, towards reader) into v re-encrypted under the reader's public
// key: only the reader can decrypt it, and the result carries the reader key's
// fingerprint. Fewer shares release nothing.
func (c *Committee) Release(v *Vector, reader *PublicKey, shares []*ReleaseShare) (out *Vector, err error) {
	defer recoverInto(&err, "release")
	if v == nil || v.params.id != c.params.id || reader == nil || reader.params.id != c.params.id {
		return nil, preconditionf("release: vector or reader key under other parameters")
	}
	if len(shares) < c.t {
		return nil, preconditionf("release needs %d members' shares, have %d", c.t, len(shares))
	}
	if len(shares) != c.t {
		return nil, invalidf("release takes exactly %d shares, have %d", c.t, len(shares))
	}
	if err := c.distinct(len(shares), func(i int) int { return shares[i].Member }); err != nil {
		return nil, err
	}
	active := slices.Sorted(slices.Values(shares[0].Active))
	for _, s := range shares {
		if !slices.Equal(slices.Sorted(slices.Values(s.Active)), active) || !slices.Contains(active, s.Member) || len(s.shares) != len(v.cts) {
			return nil, invalidf("release share of member %d made for another active set or vector", s.Member)
		}
	}
	pcks, err := mhe.NewPublicKeySwitchProtocol(c.params.p, ring.DiscreteGaussian{Sigma: 1, Bound: 8})
	if err != nil {
		return nil, internalf("public-key switch")
	}
	cts := make([]*rlwe.Ciphertext, len(v.cts))
	for i, ct := range v.cts {
		agg := pcks.AllocateShare(ct.Level())
		for _, s := range shares {
			if s.shares[i].Level() != ct.Level() {
				return nil, invalidf("release share of member %d at the wrong level", s.Member)
			}
			if err := pcks.AggregateShares(agg, s.shares[i], &agg); err != nil {
				return nil, invalidf("release share of member %d: %v", s.Member, err)
			}
		}
		cts[i] = rlwe.NewCiphertext(c.params.p, 1, ct.Level())
		pcks.KeySwitch(ct, agg, cts[i])
	}
	// The result is under the reader's key, not the committee's: it carries the reader's
	// fingerprint, so that the reader's Decrypt accepts it. A share made in this process
	// names its reader; one towards another reader is refused.
	for _, sh := range shares {
		if len(sh.reader) != 0 && !bytes.Equal(sh.reader, reader.fp) {
			return nil, invalidf("release share of member %d made towards another reader", sh.Member)
		}
	}
	out = v.derive(cts, v.length, v.dirty)
	out.fp = reader.fp
	return out, nil
}

// reduced reports whether every coefficient of p is below its limb's modulus.
func reduced(p ring.Poly, moduli []uint64) bool {
	for i, row := range p.Coeffs {
		if i >= len(moduli) {
			return false
		}
		for _, x := range row {
			if x >= moduli[i] {
				return false
			}
		}
	}
	return true
}

// MarshalBinary encodes the share (secret: seal it to its recipient before it leaves
// the process).
func (s *ShamirShare) MarshalBinary() ([]byte, error) { return s.share.MarshalBinary() }

// UnmarshalShamirShare decodes the Shamir share member from made for member to,
// as opened by its recipient.
func (c *Committee) UnmarshalShamirShare(from, to int, b []byte) (s *ShamirShare, err error) {
	defer recoverInto(&err, "decode shamir share")
	if !c.threshold {
		return nil, preconditionf("an n-out-of-n committee has no Shamir shares")
	}
	want := mhe.NewThresholdizer(c.params.p).AllocateThresholdSecretShare()
	if from < 1 || from > c.n || to < 1 || to > c.n || len(b) != want.BinarySize() {
		return nil, invalidf("shamir share %d->%d: %d bytes, want %d", from, to, len(b), want.BinarySize())
	}
	if err := want.UnmarshalBinary(b); err != nil {
		return nil, invalidf("shamir share: %v", err)
	}
	if !reduced(want.Q, c.params.p.Q()) || !reduced(want.P, c.params.p.P()) {
		return nil, invalidf("shamir share: coefficient not reduced")
	}
	return &ShamirShare{From: from, To: to, share: want}, nil
}
