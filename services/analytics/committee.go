package analytics

import (
	"context"
	"crypto/hpke"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
)

// Committee procedure names, for policies and read limits.
const (
	JoinCommitteeProcedure      = analyticsv1connect.AnalyticsServiceJoinCommitteeProcedure
	GetCommitteeProcedure       = analyticsv1connect.AnalyticsServiceGetCommitteeProcedure
	PostShamirSharesProcedure   = analyticsv1connect.AnalyticsServicePostShamirSharesProcedure
	GetAggregateProcedure       = analyticsv1connect.AnalyticsServiceGetAggregateProcedure
	SubmitReleaseShareProcedure = analyticsv1connect.AnalyticsServiceSubmitReleaseShareProcedure
)

// The HPKE suite Shamir shares are sealed with (RFC 9180, Go's crypto/hpke): the
// hybrid ML-KEM-768 + X25519 KEM, so that a share recorded today stays sealed against
// a future quantum adversary, HKDF-SHA256 and AES-256-GCM.
func shamirKEM() hpke.KEM   { return hpke.MLKEM768X25519() }
func shamirKDF() hpke.KDF   { return hpke.HKDFSHA256() }
func shamirAEAD() hpke.AEAD { return hpke.AES256GCM() }

// MaxActiveSetsPerMember bounds the active sets one member may send release shares
// for in one round: enough to retry around offline members, and a bound on what one
// member makes the server keep (each set's shares are ciphertext-sized).
const MaxActiveSetsPerMember = 4

// committeeState is a committee study's setup and release state. Guarded by the
// study's mu (the collective key's fingerprint is also in study.keyFP).
type committeeState struct {
	c       *he.Committee
	params  *he.Parameters
	members []spiffeid.ID
	reader  *he.PublicKey
	// statement is SHA-256 of the analyst's signed study statement: the committee's
	// context and what every join and sealed share is bound to.
	statement [32]byte

	joins    map[int]*analyticsv1.CommitteeJoin
	pkShares map[int]*he.PublicKeyShare
	shamir   map[[2]int]*analyticsv1.SealedShamirShare // (from, to)

	collective    *he.PublicKey
	collectiveMsg *hev1.PublicKey

	// Release shares of round pendingRound, by active set, by member; result is the
	// combination of the first active set complete in that round.
	pendingRound uint64
	pending      map[string]map[int]*memberRelease
	result       *combined
	// noisy is the current round's aggregate plus its privacy noise (studies with
	// privacy), drawn and stored on the round's first GetAggregate.
	noisy *roundVectors
}

// roundVectors are the vectors of one release round.
type roundVectors struct {
	round           uint64
	sum, prod, hist *he.Vector
}

// memberRelease is one member's decoded release shares of the aggregate's vectors.
type memberRelease struct {
	sum, prod, hist *he.ReleaseShare
}

// combined is a release re-encrypted to the reader.
type combined struct {
	round           uint64
	active          []int
	sum, prod, hist *he.Vector
}

// committeeContext returns SHA-256 of the study's signed statement.
func committeeContext(m *analyticsv1.Study) [32]byte { return sha256.Sum256(studyStatement(m)) }

// newCommitteeState checks a committee study's committee and builds its state.
func (s *Service) newCommitteeState(m *analyticsv1.Study, creating bool) (*committeeState, error) {
	cm := m.GetCommittee()
	if creating && m.GetPublicKey() != nil {
		return nil, errorf(connect.CodeInvalidArgument, "a committee study carries no public key at creation: its key is the committee's")
	}
	params, err := s.paramsByID(cm.GetReaderKey().GetParamId())
	if err != nil {
		return nil, err
	}
	reader, err := he.UnmarshalPublicKey(params, cm.GetReaderKey())
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	n, t := len(cm.GetMembers()), int(cm.GetThreshold())
	if n < 1 || t < 1 || t > n {
		return nil, errorf(connect.CodeInvalidArgument, "a committee of %d members with threshold %d: need 1 <= threshold <= members", n, t)
	}
	cs := &committeeState{params: params, reader: reader, statement: committeeContext(m),
		joins: map[int]*analyticsv1.CommitteeJoin{}, pkShares: map[int]*he.PublicKeyShare{}, shamir: map[[2]int]*analyticsv1.SealedShamirShare{}}
	for _, raw := range cm.GetMembers() {
		id, err := spiffeid.FromString(raw)
		if err != nil {
			return nil, errorf(connect.CodeInvalidArgument, "committee member %q: %v", raw, err)
		}
		if id.String() == m.GetAnalyst() {
			return nil, errorf(connect.CodeInvalidArgument, "the reader %s cannot be a committee member", id)
		}
		if creating && slices.Contains(cs.members, id) { // its second index could never join
			return nil, errorf(connect.CodeInvalidArgument, "committee member %s named twice", id)
		}
		cs.members = append(cs.members, id)
	}
	if cs.c, err = he.NewCommittee(params, cs.statement[:], n, t); err != nil {
		return nil, keys.ConnectError(err)
	}
	return cs, nil
}

// index returns id's member index (1-based), 0 for a non-member.
func (cs *committeeState) index(id spiffeid.ID) int {
	return slices.Index(cs.members, id) + 1
}

func (st *study) isMember(id spiffeid.ID) bool { return st.com != nil && st.com.index(id) > 0 }

func (st *study) isAnalystOwnerOrMember(id spiffeid.ID) bool {
	return st.isAnalystOrOwner(id) || st.isMember(id)
}

// joinStatement is what a member signs when it joins: a domain label, then
// length-prefixed: the study statement's hash, the study ID, the member's SPIFFE ID,
// its index, the parameter ID, SHA-256 of its public-key share and of its HPKE key.
func joinStatement(statement [32]byte, studyID, member string, index uint32, paramID string, pkShare, hpkeKey []byte) []byte {
	b := []byte("veil-analytics-committee-join-v1\x00")
	b = appendField(b, statement[:])
	b = appendField(b, []byte(studyID))
	b = appendField(b, []byte(member))
	b = appendUint(b, uint64(index))
	b = appendField(b, []byte(paramID))
	h := sha256.Sum256(pkShare)
	b = appendField(b, h[:])
	h = sha256.Sum256(hpkeKey)
	return appendField(b, h[:])
}

// shamirInfo is the HPKE info a Shamir share from -> to is sealed under: it binds the
// study statement and both indices, so a sealed share opens only for its recipient,
// study and position.
func shamirInfo(statement [32]byte, from, to int) []byte {
	b := []byte("veil-analytics-committee-shamir-v1\x00")
	b = append(b, statement[:]...)
	b = binary.BigEndian.AppendUint32(b, uint32(from))
	return binary.BigEndian.AppendUint32(b, uint32(to))
}

// shamirSignedStatement is what member from signs, inside the sealed payload, for
// its Shamir share to member to: a domain label, then length-prefixed: the study
// statement's hash, from, to and SHA-256 of the share. HPKE's base mode hides the
// share from all but its recipient, but anyone with the recipient's public key can
// seal one; the signature shows the recipient who made it.
func shamirSignedStatement(statement [32]byte, from, to int, share []byte) []byte {
	b := []byte("veil-analytics-committee-shamir-sig-v1\x00")
	b = appendField(b, statement[:])
	b = appendUint(b, uint64(from))
	b = appendUint(b, uint64(to))
	h := sha256.Sum256(share)
	return appendField(b, h[:])
}

// maxShamirChain bounds the certificates a sealed Shamir payload may carry.
const maxShamirChain = 8

// shamirPayload is the plaintext a Shamir share is sealed as: length-prefixed (8-byte
// big-endian lengths) the share and the sender's signature, then the number of
// certificates and each certificate (DER, leaf first).
func shamirPayload(share, sig []byte, chain [][]byte) []byte {
	b := appendField(nil, share)
	b = appendField(b, sig)
	b = appendUint(b, uint64(len(chain)))
	for _, c := range chain {
		b = appendField(b, c)
	}
	return b
}

// parseShamirPayload parses an opened Shamir payload (untrusted: the recipient
// opened it, anyone may have sealed it).
func parseShamirPayload(b []byte) (share, sig []byte, chain [][]byte, err error) {
	next := func() ([]byte, bool) {
		if len(b) < 8 {
			return nil, false
		}
		n := binary.BigEndian.Uint64(b)
		if n > uint64(len(b)-8) {
			return nil, false
		}
		f := b[8 : 8+n]
		b = b[8+n:]
		return f, true
	}
	bad := fmt.Errorf("%w: malformed Shamir payload", ErrUntrustedStudy)
	var ok bool
	if share, ok = next(); !ok {
		return nil, nil, nil, bad
	}
	if sig, ok = next(); !ok || len(b) < 8 {
		return nil, nil, nil, bad
	}
	n := binary.BigEndian.Uint64(b)
	b = b[8:]
	if n < 1 || n > maxShamirChain {
		return nil, nil, nil, bad
	}
	for range n {
		c, ok := next()
		if !ok {
			return nil, nil, nil, bad
		}
		chain = append(chain, c)
	}
	if len(b) != 0 {
		return nil, nil, nil, bad
	}
	return share, sig, chain, nil
}

func recordName(parts ...string) string {
	h := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return hex.EncodeToString(h[:])
}

func joinName(studyID string, member int) string {
	return recordName("veil-analytics-join", studyID, fmt.Sprint(member))
}

func shamirName(studyID string, from, to int) string {
	return recordName("veil-analytics-shamir", studyID, fmt.Sprint(from), fmt.Sprint(to))
}

func releaseShareName(studyID string, round uint64, member int, active []int) string {
	return recordName("veil-analytics-release-share", studyID, fmt.Sprint(round), fmt.Sprint(member), activeKey(active))
}

func roundNoiseName(studyID string, round uint64) string {
	return recordName("veil-analytics-round-noise", studyID, fmt.Sprint(round))
}

func activeKey(active []int) string { return fmt.Sprint(slices.Sorted(slices.Values(active))) }

// storedRecord is a stored record awaiting its turn in syncLocked.
type storedRecord struct {
	name string
	rec  *analyticsv1.StoredSubmission
}

// addJoinLocked records a decoded join; once all members have joined it forms the
// collective key.
func (st *study) addJoinLocked(j *analyticsv1.CommitteeJoin, share *he.PublicKeyShare) error {
	cs := st.com
	idx := int(j.GetMember())
	cs.joins[idx], cs.pkShares[idx] = j, share
	if len(cs.joins) != len(cs.members) || cs.collective != nil {
		return nil
	}
	shares := make([]*he.PublicKeyShare, 0, len(cs.members))
	for i := 1; i <= len(cs.members); i++ {
		shares = append(shares, cs.pkShares[i])
	}
	pk, err := cs.c.PublicKey(shares)
	if err != nil {
		return keys.ConnectError(err)
	}
	msg, err := he.MarshalPublicKey(pk)
	if err != nil {
		return keys.ConnectError(err)
	}
	cs.collective, cs.collectiveMsg = pk, msg
	fp := pk.Fingerprint()
	st.keyFP.Store(&fp)
	return nil
}

// applySetupLocked counts stored joins and Shamir shares (from a restart or another
// replica); a record that does not decode is quarantined.
func (s *Service) applySetupLocked(st *study, recs []storedRecord) {
	id := st.meta.GetStudyId()
	for _, r := range recs {
		switch j, sh := r.rec.GetJoin(), r.rec.GetShamir(); {
		case j != nil:
			idx := int(j.GetMember())
			if r.name != joinName(id, idx) {
				s.quarantine(st, r.name, "name does not match the record")
				continue
			}
			st.seen[r.name] = true
			if st.com.joins[idx] != nil {
				continue
			}
			share, err := st.com.c.UnmarshalPublicKeyShare(idx, j.GetPublicKeyShare())
			if err != nil {
				s.quarantine(st, r.name, err.Error())
				continue
			}
			if err := st.addJoinLocked(j, share); err != nil {
				s.quarantine(st, r.name, err.Error())
			}
		case sh != nil:
			from, to := int(sh.GetFrom()), int(sh.GetTo())
			if r.name != shamirName(id, from, to) {
				s.quarantine(st, r.name, "name does not match the record")
				continue
			}
			st.seen[r.name] = true
			if st.com.shamir[[2]int{from, to}] == nil {
				st.com.shamir[[2]int{from, to}] = sh
			}
		}
	}
}

// applyReleaseSharesLocked counts stored release shares of the current round.
func (s *Service) applyReleaseSharesLocked(st *study, recs []storedRecord) {
	id := st.meta.GetStudyId()
	for _, r := range recs { // the round's noise first: the shares are of the noisy aggregate
		rn := r.rec.GetRoundNoise()
		if rn == nil {
			continue
		}
		if r.name != roundNoiseName(id, rn.GetRound()) {
			s.quarantine(st, r.name, "name does not match the record")
			continue
		}
		st.seen[r.name] = true
		if st.closed == nil || rn.GetRound() != st.releases+1 || (st.com.noisy != nil && st.com.noisy.round == rn.GetRound()) {
			continue
		}
		if err := st.setNoiseLocked(context.Background(), rn); err != nil {
			s.quarantine(st, r.name, err.Error())
		}
	}
	for _, r := range recs {
		rs := r.rec.GetReleaseShare()
		if rs == nil {
			continue
		}
		req, member := rs.GetRequest(), int(rs.GetMember())
		active := toInts(req.GetActive())
		if r.name != releaseShareName(id, req.GetRound(), member, active) {
			s.quarantine(st, r.name, "name does not match the record")
			continue
		}
		if st.closed == nil || req.GetRound() != st.releases+1 {
			st.seen[r.name] = true // a past round's
			continue
		}
		if _, err := st.addReleaseShareLocked(member, req); err != nil {
			s.quarantine(st, r.name, err.Error())
			continue
		}
		st.seen[r.name] = true
	}
}

func toInts(xs []uint32) []int {
	out := make([]int, len(xs))
	for i, x := range xs {
		out[i] = int(x)
	}
	return out
}

// checkActive checks an active set: exactly t distinct members, member among them.
func (cs *committeeState) checkActive(member int, active []int) error {
	t := cs.c.Threshold()
	if len(active) != t || !slices.Contains(active, member) {
		return errorf(connect.CodeInvalidArgument, "the active set must hold exactly %d members, the sender included", t)
	}
	seen := map[int]bool{}
	for _, a := range active {
		if a < 1 || a > len(cs.members) || seen[a] {
			return errorf(connect.CodeInvalidArgument, "active member %d unknown or repeated", a)
		}
		seen[a] = true
	}
	return nil
}

// addReleaseShareLocked decodes member's release shares of the closed aggregate for
// the current round, and combines once threshold members of one active set are in.
// It returns the number of shares of that active set.
func (st *study) addReleaseShareLocked(member int, req *analyticsv1.SubmitReleaseShareRequest) (int, error) {
	cs := st.com
	active := toInts(req.GetActive())
	if err := cs.checkActive(member, active); err != nil {
		return 0, err
	}
	round := st.releases + 1
	if cs.pendingRound != round {
		cs.pendingRound, cs.pending = round, map[string]map[int]*memberRelease{}
	}
	key := activeKey(active)
	if got := cs.pending[key][member]; got != nil {
		return len(cs.pending[key]), nil // the first share stands
	}
	sets := 0
	for _, g := range cs.pending {
		if g[member] != nil {
			sets++
		}
	}
	if sets >= MaxActiveSetsPerMember {
		return 0, errorf(connect.CodeResourceExhausted, "member %d has sent release shares for %d active sets this round, the most one member may", member, sets)
	}
	dec := func(v *he.Vector, b []byte, what string) (*he.ReleaseShare, error) {
		if v == nil {
			if len(b) != 0 {
				return nil, errorf(connect.CodeInvalidArgument, "the study has no %s", what)
			}
			return nil, nil
		}
		rs, err := cs.c.UnmarshalReleaseShare(member, active, v, b)
		if err != nil {
			return nil, keys.ConnectError(err)
		}
		return rs, nil
	}
	rv, err := st.roundVectorsLocked(round)
	if err != nil {
		return 0, err
	}
	var mr memberRelease
	if mr.sum, err = dec(rv.sum, req.GetSum(), "sum"); err != nil {
		return 0, err
	}
	if mr.prod, err = dec(rv.prod, req.GetSumProducts(), "sum_products"); err != nil {
		return 0, err
	}
	if mr.hist, err = dec(rv.hist, req.GetHistogram(), "histogram"); err != nil {
		return 0, err
	}
	if cs.pending[key] == nil {
		cs.pending[key] = map[int]*memberRelease{}
	}
	cs.pending[key][member] = &mr
	group := cs.pending[key]
	if len(group) < cs.c.Threshold() || (cs.result != nil && cs.result.round == round) {
		return len(group), nil
	}
	res := &combined{round: round, active: slices.Sorted(slices.Values(active))}
	for _, part := range []struct {
		v   *he.Vector
		get func(*memberRelease) *he.ReleaseShare
		dst **he.Vector
	}{
		{rv.sum, func(m *memberRelease) *he.ReleaseShare { return m.sum }, &res.sum},
		{rv.prod, func(m *memberRelease) *he.ReleaseShare { return m.prod }, &res.prod},
		{rv.hist, func(m *memberRelease) *he.ReleaseShare { return m.hist }, &res.hist},
	} {
		if part.v == nil {
			continue
		}
		shares := make([]*he.ReleaseShare, 0, len(group))
		for _, m := range group {
			shares = append(shares, part.get(m))
		}
		if *part.dst, err = cs.c.Release(part.v, cs.reader, shares); err != nil {
			return 0, keys.ConnectError(err)
		}
	}
	cs.result = res
	return len(group), nil
}

// JoinCommittee records the calling member's public-key share and HPKE key.
func (s *Service) JoinCommittee(ctx context.Context, req *connect.Request[analyticsv1.JoinCommitteeRequest]) (*connect.Response[analyticsv1.JoinCommitteeResponse], error) {
	id := req.Msg.GetStudyId()
	st, who, err := s.authorize(ctx, id, "join the committee of", (*study).isMember)
	if err != nil {
		return nil, err
	}
	cs := st.com
	idx := cs.index(who)
	j := proto.CloneOf(req.Msg.GetJoin())
	j.Member = uint32(idx)
	share, err := cs.c.UnmarshalPublicKeyShare(idx, j.GetPublicKeyShare())
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	if _, err := shamirKEM().NewPublicKey(j.GetHpkePublicKey()); err != nil {
		return nil, errorf(connect.CodeInvalidArgument, "the HPKE key is not an ML-KEM-768+X25519 public key")
	}
	stmt := joinStatement(cs.statement, id, who.String(), uint32(idx), string(cs.params.ID()), j.GetPublicKeyShare(), j.GetHpkePublicKey())
	signer, err := verifyStatement(j.GetSignature().GetChain(), j.GetSignature().GetSignature(), stmt, nil)
	if err != nil {
		return nil, errorf(connect.CodeInvalidArgument, "join signature: %v", err)
	}
	if signer != who {
		return nil, errorf(connect.CodeInvalidArgument, "the join is signed by %s, the caller is %s", signer, who)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := s.syncLocked(ctx, st); err != nil {
		return nil, err
	}
	if prev := cs.joins[idx]; prev != nil {
		if !proto.Equal(prev, j) {
			return nil, errorf(connect.CodeFailedPrecondition, "member %d of study %q has joined with another share", idx, id)
		}
		return connect.NewResponse(&analyticsv1.JoinCommitteeResponse{Member: uint32(idx), Joined: uint32(len(cs.joins))}), nil
	}
	if s.cfg.store != nil {
		added, err := s.storeRecord(ctx, id, joinName(id, idx), &analyticsv1.StoredSubmission{Join: j})
		if err != nil {
			return nil, err
		}
		if !added { // another replica stored this member's join first
			if err := s.syncLocked(ctx, st); err != nil {
				return nil, err
			}
			if !proto.Equal(cs.joins[idx], j) {
				return nil, errorf(connect.CodeFailedPrecondition, "member %d of study %q has joined with another share", idx, id)
			}
			return connect.NewResponse(&analyticsv1.JoinCommitteeResponse{Member: uint32(idx), Joined: uint32(len(cs.joins))}), nil
		}
		st.seen[joinName(id, idx)] = true
	}
	if err := st.addJoinLocked(j, share); err != nil {
		return nil, err
	}
	return connect.NewResponse(&analyticsv1.JoinCommitteeResponse{Member: uint32(idx), Joined: uint32(len(cs.joins))}), nil
}

// storeRecord stores one lifecycle record under name.
func (s *Service) storeRecord(ctx context.Context, studyID, name string, rec *analyticsv1.StoredSubmission) (bool, error) {
	b, err := proto.Marshal(rec)
	if err != nil {
		return false, errorf(connect.CodeInternal, "encoding a record")
	}
	sctx, cancel := s.storeCtx(ctx)
	defer cancel()
	added, err := s.cfg.store.AddSubmission(sctx, studyID, name, b)
	if err != nil {
		return false, unavailable()
	}
	return added, nil
}

// GetCommittee returns the joins, once every member has joined, and, to a member, the
// Shamir shares sealed to it.
func (s *Service) GetCommittee(ctx context.Context, req *connect.Request[analyticsv1.GetCommitteeRequest]) (*connect.Response[analyticsv1.GetCommitteeResponse], error) {
	st, who, err := s.authorize(ctx, req.Msg.GetStudyId(), "read the committee of", (*study).isAnalystOwnerOrMember)
	if err != nil {
		return nil, err
	}
	if st.com == nil {
		return nil, errorf(connect.CodeFailedPrecondition, "study %q is a single-key study", req.Msg.GetStudyId())
	}
	st.mu.Lock()
	if err := s.syncLocked(ctx, st); err != nil {
		st.mu.Unlock()
		return nil, err
	}
	cs := st.com
	res := &analyticsv1.GetCommitteeResponse{Joined: uint32(len(cs.joins))}
	me, n := cs.index(who), len(cs.members)
	// No join is served before every member has joined: a member that read the others'
	// public-key shares before fixing its own could send its own minus theirs, and the
	// collective key would be its own (a rogue key, he.TestCommitteeRogueKeyShare).
	complete := len(cs.joins) == n
	for i := 1; i <= n; i++ {
		if j := cs.joins[i]; j != nil && complete {
			res.Joins = append(res.Joins, j)
		}
		if me > 0 && i != me {
			if sh := cs.shamir[[2]int{i, me}]; sh != nil {
				res.SharesForCaller = append(res.SharesForCaller, sh)
			}
		}
		posted := 0
		for k := 1; k <= n; k++ {
			if cs.shamir[[2]int{i, k}] != nil {
				posted++
			}
		}
		if posted == n-1 && n > 1 {
			res.SharesPostedBy = append(res.SharesPostedBy, uint32(i))
		}
	}
	st.mu.Unlock()
	res.Study = st.view()
	return connect.NewResponse(res), nil
}

// PostShamirShares stores the calling member's sealed Shamir shares, one for every
// other member. A share already stored for a recipient stands (a retry re-seals the
// same share, so its bytes differ).
func (s *Service) PostShamirShares(ctx context.Context, req *connect.Request[analyticsv1.PostShamirSharesRequest]) (*connect.Response[analyticsv1.PostShamirSharesResponse], error) {
	id := req.Msg.GetStudyId()
	st, who, err := s.authorize(ctx, id, "post Shamir shares to", (*study).isMember)
	if err != nil {
		return nil, err
	}
	cs := st.com
	me, n := cs.index(who), len(cs.members)
	if cs.c.Threshold() == n {
		return nil, errorf(connect.CodeFailedPrecondition, "study %q: an %d-out-of-%d committee has no Shamir shares", id, n, n)
	}
	shares := req.Msg.GetShares()
	if len(shares) != n-1 {
		return nil, errorf(connect.CodeInvalidArgument, "%d Shamir shares: one for each of the %d other members", len(shares), n-1)
	}
	seen := map[int]bool{}
	for _, sh := range shares {
		to := int(sh.GetTo())
		if to < 1 || to > n || to == me || seen[to] {
			return nil, errorf(connect.CodeInvalidArgument, "Shamir share for member %d: unknown, the sender or repeated", to)
		}
		seen[to] = true
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := s.syncLocked(ctx, st); err != nil {
		return nil, err
	}
	if len(cs.joins) != n {
		return nil, errorf(connect.CodeFailedPrecondition, "study %q: %d of %d members have joined; Shamir shares follow every join", id, len(cs.joins), n)
	}
	for _, sh := range shares {
		to := int(sh.GetTo())
		if cs.shamir[[2]int{me, to}] != nil {
			continue
		}
		rec := proto.CloneOf(sh)
		rec.From = uint32(me)
		if s.cfg.store != nil {
			name := shamirName(id, me, to)
			added, err := s.storeRecord(ctx, id, name, &analyticsv1.StoredSubmission{Shamir: rec})
			if err != nil {
				return nil, err
			}
			if !added {
				if err := s.syncLocked(ctx, st); err != nil {
					return nil, err
				}
				continue
			}
			st.seen[name] = true
		}
		cs.shamir[[2]int{me, to}] = rec
	}
	return connect.NewResponse(&analyticsv1.PostShamirSharesResponse{}), nil
}

// GetAggregate returns a closed committee study's aggregate (under the collective
// key) to its members, with the current release round.
func (s *Service) GetAggregate(ctx context.Context, req *connect.Request[analyticsv1.GetAggregateRequest]) (*connect.Response[analyticsv1.GetAggregateResponse], error) {
	id := req.Msg.GetStudyId()
	st, _, err := s.authorize(ctx, id, "read the aggregate of", (*study).isMember)
	if err != nil {
		return nil, err
	}
	st.mu.Lock()
	if err := s.syncLocked(ctx, st); err != nil {
		st.mu.Unlock()
		return nil, err
	}
	if st.closed == nil || st.submissions == 0 {
		st.mu.Unlock()
		return nil, errorf(connect.CodeFailedPrecondition, "study %q is not closed with submissions", id)
	}
	rv, err := s.drawRoundLocked(ctx, st)
	if err != nil {
		st.mu.Unlock()
		return nil, err
	}
	res := &analyticsv1.GetAggregateResponse{Round: rv.round, Submissions: st.submissions, Count: st.count}
	sum, prod, hist := rv.sum, rv.prod, rv.hist
	st.mu.Unlock()
	if res.Sum, err = he.MarshalVector(sum); err != nil {
		return nil, keys.ConnectError(err)
	}
	if res.SumProducts, err = he.MarshalVector(prod); err != nil {
		return nil, keys.ConnectError(err)
	}
	if hist != nil {
		if res.Histogram, err = he.MarshalVector(hist); err != nil {
			return nil, keys.ConnectError(err)
		}
	}
	return connect.NewResponse(res), nil
}

// SubmitReleaseShare records the calling member's release shares for the current
// round; once threshold members of one active set are in, the reader's GetResult
// returns the result.
func (s *Service) SubmitReleaseShare(ctx context.Context, req *connect.Request[analyticsv1.SubmitReleaseShareRequest]) (*connect.Response[analyticsv1.SubmitReleaseShareResponse], error) {
	id := req.Msg.GetStudyId()
	st, who, err := s.authorize(ctx, id, "release", (*study).isMember)
	if err != nil {
		return nil, err
	}
	cs := st.com
	me := cs.index(who)
	if req.Msg.GetParamId() != string(cs.params.ID()) {
		return nil, errorf(connect.CodeInvalidArgument, "release share for parameter set %s, the study uses %s", req.Msg.GetParamId(), cs.params.ID())
	}
	active := toInts(req.Msg.GetActive())
	if err := cs.checkActive(me, active); err != nil {
		return nil, err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := s.syncLocked(ctx, st); err != nil {
		return nil, err
	}
	if st.closed == nil || st.submissions == 0 {
		return nil, errorf(connect.CodeFailedPrecondition, "study %q is not closed with submissions", id)
	}
	if r := req.Msg.GetRound(); r != st.releases+1 {
		return nil, errorf(connect.CodeFailedPrecondition, "release share for round %d, the study's current round is %d", r, st.releases+1)
	}
	// Decode (and maybe combine) before storing: nothing is stored that cannot count.
	prevResult := cs.result
	n, err := st.addReleaseShareLocked(me, req.Msg)
	if err != nil {
		return nil, err
	}
	if s.cfg.store != nil {
		name := releaseShareName(id, req.Msg.GetRound(), me, active)
		if _, err := s.storeRecord(ctx, id, name, &analyticsv1.StoredSubmission{ReleaseShare: &analyticsv1.StoredReleaseShare{Member: uint32(me), Request: req.Msg}}); err != nil {
			// Not durable: forget it, so that the member's retry counts it.
			delete(cs.pending[activeKey(active)], me)
			cs.result = prevResult
			return nil, err
		}
		st.seen[name] = true
	}
	ready := cs.result != nil && cs.result.round == st.releases+1
	return connect.NewResponse(&analyticsv1.SubmitReleaseShareResponse{Shares: uint32(n), Ready: ready}), nil
}

// committeeResultLocked returns the combined release of the current round to the
// reader and records the release; st.mu is held.
func (s *Service) committeeResultLocked(ctx context.Context, st *study, reader string) (*analyticsv1.GetResultResponse, error) {
	cs := st.com
	round := st.releases + 1
	if cs.result == nil || cs.result.round != round {
		most := 0
		if cs.pendingRound == round {
			for _, g := range cs.pending {
				most = max(most, len(g))
			}
		}
		return nil, errorf(connect.CodeFailedPrecondition, "study %q: release round %d needs release shares from %d members of one active set, the most so far is %d", st.meta.GetStudyId(), round, cs.c.Threshold(), most)
	}
	r := cs.result
	n, count := st.submissions, st.count
	seq, err := s.recordRelease(ctx, st, reader)
	if err != nil {
		return nil, err
	}
	res := &analyticsv1.GetResultResponse{Submissions: n, Count: count, Release: seq}
	if res.Sum, err = he.MarshalVector(r.sum); err != nil {
		return nil, keys.ConnectError(err)
	}
	if res.SumProducts, err = he.MarshalVector(r.prod); err != nil {
		return nil, keys.ConnectError(err)
	}
	if r.hist != nil {
		if res.Histogram, err = he.MarshalVector(r.hist); err != nil {
			return nil, keys.ConnectError(err)
		}
	}
	return res, nil
}

// roundVectorsLocked returns the vectors the release shares of round are of: the
// aggregate, plus the round's privacy noise for a study with privacy (which must have
// been drawn: GetAggregate draws it). st.mu is held.
func (st *study) roundVectorsLocked(round uint64) (*roundVectors, error) {
	if st.meta.GetPrivacy() == nil {
		return &roundVectors{round: round, sum: st.sum, prod: st.products, hist: st.histogram}, nil
	}
	if rv := st.com.noisy; rv != nil && rv.round == round {
		return rv, nil
	}
	return nil, errorf(connect.CodeFailedPrecondition, "release round %d of study %q has no aggregate yet: members fetch it first", round, st.meta.GetStudyId())
}

// drawRoundLocked returns the current round's vectors, drawing and storing its privacy
// noise on first use (refused once the budget is spent). st.mu is held.
func (s *Service) drawRoundLocked(ctx context.Context, st *study) (*roundVectors, error) {
	round := st.releases + 1
	if rv, err := st.roundVectorsLocked(round); err == nil {
		return rv, nil
	}
	if !st.budgetLeft() {
		return nil, errorf(connect.CodeResourceExhausted, "study %q: its privacy budget (epsilon %g, %g per release) is spent after %d releases", st.meta.GetStudyId(), st.meta.GetPrivacy().GetEpsilon(), st.meta.GetPrivacy().GetEpsilonPerRelease(), st.releases)
	}
	enc, err := he.NewEncryptor(st.com.collective)
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	histLen := 0
	if st.histogram != nil {
		histLen = st.histogram.Len()
	}
	ns, np, nh, err := st.releaseNoise(enc, st.sum.Len(), st.products.Len(), histLen)
	if err != nil {
		return nil, err
	}
	rn := &analyticsv1.StoredRoundNoise{Round: round}
	for _, p := range []struct {
		v   *he.Vector
		dst **hev1.EncryptedVector
	}{{ns, &rn.Sum}, {np, &rn.SumProducts}, {nh, &rn.Histogram}} {
		if p.v == nil {
			continue
		}
		if *p.dst, err = he.MarshalVector(p.v); err != nil {
			return nil, keys.ConnectError(err)
		}
	}
	id := st.meta.GetStudyId()
	if s.cfg.store != nil {
		added, err := s.storeRecord(ctx, id, roundNoiseName(id, round), &analyticsv1.StoredSubmission{RoundNoise: rn})
		if err != nil {
			return nil, err
		}
		if !added { // another replica drew this round's noise first: adopt it
			if err := s.syncLocked(ctx, st); err != nil {
				return nil, err
			}
			return st.roundVectorsLocked(round)
		}
		st.seen[roundNoiseName(id, round)] = true
	}
	if err := st.setNoiseLocked(ctx, rn); err != nil {
		return nil, err
	}
	return st.roundVectorsLocked(round)
}

// setNoiseLocked makes the aggregate plus rn's noise the vectors of rn's round.
func (st *study) setNoiseLocked(ctx context.Context, rn *analyticsv1.StoredRoundNoise) error {
	rv := &roundVectors{round: rn.GetRound()}
	for _, p := range []struct {
		agg *he.Vector
		m   *hev1.EncryptedVector
		dst **he.Vector
	}{{st.sum, rn.GetSum(), &rv.sum}, {st.products, rn.GetSumProducts(), &rv.prod}, {st.histogram, rn.GetHistogram(), &rv.hist}} {
		if p.agg == nil {
			continue
		}
		n, err := he.UnmarshalVector(st.params, p.m)
		if err != nil {
			return keys.ConnectError(err)
		}
		if *p.dst, err = st.withNoise(ctx, p.agg, n); err != nil {
			return err
		}
	}
	st.com.noisy = rv
	return nil
}
