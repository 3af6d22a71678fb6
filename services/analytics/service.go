// Package analytics is encrypted aggregation for many data owners (veil.analytics.v1).
//
// An analyst creates a study with a CKKS public key and the SPIFFE ID patterns of
// the owners allowed to contribute. Each owner sums its records locally, encrypts
// the per-coordinate sums and the sums of squares (or of all pairwise products, for a
// covariance study), and optionally its per-bin record counts, under the analyst's
// public key, and submits them with its record count (self-reported, in the clear).
// The service checks that every vector names the study's public key (its
// fingerprint) and adds the ciphertexts up. It holds no secret key and no evaluation
// key: additions need none. Only the analyst may fetch the result; the analyst's
// client decrypts the sums and computes, in the clear, the mean and second moments
// (sums divided by the record count) and the variance and covariance (second moment
// minus the product of means). For readers that do not ask for sums only, the service
// also returns the mean and second moments computed homomorphically (times 1/count).
//
// A study is open, then closed, then released. Submissions count only while it is
// open, at most MaxSubmissionsPerOwner (default 1) per owner; the analyst closes it
// once owners from at least MinOwners (default 2) distinct identities, never the
// analyst's own, have submitted;
// results exist only for a closed study, so that no two results differ by one
// submission, and every result returned is recorded as a release. Submissions must
// be fresh encryptions (top level, default scale): they are validated and added
// before anything is stored, and a bad stored record is quarantined (logged and
// skipped) when the service loads.
//
// Submissions are durable with a Store (WithStore: one file per submission, written
// atomically, 0600; WithStudyStore: a shared store such as NATS JetStream, so that
// replicas share studies and submissions) and idempotent: the same owner and
// idempotency key count once, across replicas too.
// See docs/services.md for what the service learns.
package analytics

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// Procedure names, for policies and read limits.
const (
	CreateStudyProcedure = analyticsv1connect.AnalyticsServiceCreateStudyProcedure
	GetStudyProcedure    = analyticsv1connect.AnalyticsServiceGetStudyProcedure
	SubmitProcedure      = analyticsv1connect.AnalyticsServiceSubmitProcedure
	GetResultProcedure   = analyticsv1connect.AnalyticsServiceGetResultProcedure
	CloseStudyProcedure  = analyticsv1connect.AnalyticsServiceCloseStudyProcedure
)

// Release rule defaults, for studies that leave them zero.
const (
	DefaultMinOwners              = 2
	DefaultMaxSubmissionsPerOwner = 1
)

// Option configures New. Options are values with an unexported method, as in connect-go and package rpc.
type Option interface{ applyToService(*config) }

type option func(*config)

func (f option) applyToService(c *config) { f(c) }

type config struct {
	dir     string
	store   Store
	timeout time.Duration
	params  []*he.Parameters
	logger  *slog.Logger
}

// WithLogger sets the logger for quarantined records (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return option(func(c *config) { c.logger = l }) }

// WithStore keeps studies and submissions in dir (a DirStore, created 0700), so that a
// restarted service keeps them. Without a store they live in memory only.
func WithStore(dir string) Option { return option(func(c *config) { c.dir = dir }) }

// WithStudyStore keeps studies and submissions in store, which replicas may share.
// Every store operation is bounded by timeout (default 30 seconds).
func WithStudyStore(store Store, timeout time.Duration) Option {
	return option(func(c *config) { c.store, c.timeout = store, timeout })
}

// WithParameters sets the parameter sets studies may use (default he.Presets()).
func WithParameters(ps ...*he.Parameters) Option { return option(func(c *config) { c.params = ps }) }

// Service implements analyticsv1connect.AnalyticsServiceHandler.
type Service struct {
	cfg config

	mu      sync.Mutex
	studies map[string]*study
}

var _ analyticsv1connect.AnalyticsServiceHandler = (*Service)(nil)

type study struct {
	mu       sync.Mutex
	meta     *analyticsv1.Study
	params   *he.Parameters
	patterns []transport.Pattern
	eval     *he.Evaluator
	enc      *he.Encryptor // the study key's, for privacy noise; nil without privacy
	// keyFP is the fingerprint of the study's public key: every submitted vector
	// must carry it. A committee study's is set once every member has joined.
	keyFP atomic.Pointer[[]byte]
	// com is a committee study's key setup and release state; nil for a single-key
	// study (committee.go).
	com *committeeState

	sum, products *he.Vector
	histogram     *he.Vector // nil unless the study has histogram edges
	count         uint64
	submissions   uint64
	seen          map[string]bool   // every record name read or written (counted or not)
	counted       map[string]string // counted submission name -> owner
	perOwner      map[string]int    // owner -> counted submissions
	closed        map[string]bool   // the names a close fixed; nil while open
	releases      uint64
}

func (st *study) minOwners() int {
	if n := st.meta.GetMinOwners(); n > 0 {
		return int(n)
	}
	return DefaultMinOwners
}

func (st *study) maxPerOwner() int {
	if n := st.meta.GetMaxSubmissionsPerOwner(); n > 0 {
		return int(n)
	}
	return DefaultMaxSubmissionsPerOwner
}

func (st *study) state() analyticsv1.StudyState {
	switch {
	case st.closed == nil:
		return analyticsv1.StudyState_STUDY_STATE_OPEN
	case st.releases == 0:
		return analyticsv1.StudyState_STUDY_STATE_CLOSED
	default:
		return analyticsv1.StudyState_STUDY_STATE_RELEASED
	}
}

// New returns the service, loading every study and submission from the store.
func New(opts ...Option) (*Service, error) {
	cfg := config{params: he.Presets(), logger: slog.Default()}
	for _, o := range opts {
		o.applyToService(&cfg)
	}
	if cfg.dir != "" {
		if cfg.store != nil {
			return nil, errors.New("analytics: WithStore and WithStudyStore are exclusive")
		}
		d, err := NewDirStore(cfg.dir)
		if err != nil {
			return nil, err
		}
		cfg.store = d
	}
	if cfg.timeout <= 0 {
		cfg.timeout = 30 * time.Second
	}
	s := &Service{cfg: cfg, studies: map[string]*study{}}
	if cfg.store == nil {
		return s, nil
	}
	if err := s.load(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Service) storeCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), s.cfg.timeout)
}

// unavailable is the answer when the store fails: the caller may retry, and nothing
// unacknowledged was counted.
func unavailable() error { return errorf(connect.CodeUnavailable, "store unavailable") }

// Register mounts the service on srv. The server's options should include
// ServerOptions(params) for the largest parameters studies use.
func (s *Service) Register(srv *rpc.Server) {
	rpc.Register[analyticsv1connect.AnalyticsServiceHandler](srv, analyticsv1connect.NewAnalyticsServiceHandler, s)
}

// ReadLimits returns the per-procedure read limits studies on params need:
// CreateStudy carries a public key, Submit up to three one-ciphertext vectors (sums,
// products, histogram); the committee procedures as much (a public-key share, the
// Shamir shares of a committee of up to 64, the release shares of three vectors).
func ReadLimits(params *he.Parameters) map[string]int64 {
	lit := params.Literal()
	pk := int64(2*(len(lit.LogQ)+len(lit.LogP))*params.N()*8) + 64<<10
	vectors := 3*he.MaxVectorWireSize(params, params.Slots()) + 4096
	return map[string]int64{
		CreateStudyProcedure: pk,
		SubmitProcedure:      vectors,
		// A public-key share is one of the key's two polynomials, a Shamir share one
		// more (up to 63 of them), a release share the size of the vectors.
		JoinCommitteeProcedure:      pk,
		PostShamirSharesProcedure:   32 * pk,
		SubmitReleaseShareProcedure: vectors,
	}
}

// ServerOptions returns rpc.WithReadLimit for each limit of ReadLimits(params) above
// rpc.DefaultReadLimit.
func ServerOptions(params *he.Parameters) []rpc.ServerOption {
	var out []rpc.ServerOption
	for p, n := range ReadLimits(params) {
		if n > rpc.DefaultReadLimit {
			out = append(out, rpc.WithReadLimit(p, n))
		}
	}
	return out
}

func errorf(code connect.Code, format string, args ...any) error {
	return connect.NewError(code, fmt.Errorf("analytics: "+format, args...))
}

func caller(ctx context.Context) (spiffeid.ID, error) {
	p, ok := rpc.PeerFromContext(ctx)
	if !ok || p.ID.IsZero() {
		return spiffeid.ID{}, errorf(connect.CodeUnauthenticated, "no verified caller")
	}
	return p.ID, nil
}

func (s *Service) paramsByID(id string) (*he.Parameters, error) {
	for _, p := range s.cfg.params {
		if string(p.ID()) == id {
			return p, nil
		}
	}
	return nil, errorf(connect.CodeInvalidArgument, "parameter set %s is not one this service accepts", id)
}

// productsLen returns the length of a study's products vector.
func productsLen(m *analyticsv1.Study) int {
	d := int(m.GetDimension())
	if m.GetCovariance() {
		return d * d
	}
	return d
}

// newStudy checks a study's metadata and builds its in-memory state. A study being
// created must declare its ranges; one loaded from the store keeps what it had.
func (s *Service) newStudy(m *analyticsv1.Study, creating bool) (*study, error) {
	var params *he.Parameters
	var com *committeeState
	var fp []byte
	var enc *he.Encryptor
	var err error
	if m.GetCommittee() != nil {
		if com, err = s.newCommitteeState(m, creating); err != nil {
			return nil, err
		}
		params = com.params
	} else {
		if m.GetPublicKey() == nil {
			return nil, errorf(connect.CodeInvalidArgument, "a single-key study needs a public key")
		}
		if params, err = s.paramsByID(m.GetPublicKey().GetParamId()); err != nil {
			return nil, err
		}
		pk, err := he.UnmarshalPublicKey(params, m.GetPublicKey())
		if err != nil {
			return nil, keys.ConnectError(err)
		}
		fp = pk.Fingerprint()
		if m.GetPrivacy() != nil {
			if enc, err = he.NewEncryptor(pk); err != nil {
				return nil, keys.ConnectError(err)
			}
		}
	}
	if err := checkPrivacy(m); err != nil {
		return nil, err
	}
	if d := int(m.GetDimension()); d < 1 || productsLen(m) > params.Slots() {
		return nil, errorf(connect.CodeInvalidArgument, "a study of dimension %d (covariance %v) needs %d slots, the parameters have %d", d, m.GetCovariance(), productsLen(m), params.Slots())
	}
	if err := checkEdges(m.GetHistogramEdges()); err != nil {
		return nil, err
	}
	if n := histogramLen(m); n > params.Slots() {
		return nil, errorf(connect.CodeInvalidArgument, "a histogram of %d bins over %d coordinates needs %d slots, the parameters have %d", bins(m), m.GetDimension(), n, params.Slots())
	}
	if err := checkRanges(m, creating); err != nil {
		return nil, err
	}
	if m.GetMinOwners() == 1 {
		return nil, errorf(connect.CodeInvalidArgument, "min_owners must be at least 2: one owner's submission would be the result")
	}
	st := &study{meta: m, params: params, com: com, enc: enc, seen: map[string]bool{}, counted: map[string]string{}, perOwner: map[string]int{}}
	if fp != nil {
		st.keyFP.Store(&fp)
	}
	for _, raw := range m.GetOwnerPatterns() {
		p, err := transport.ParsePattern(raw)
		if err != nil {
			return nil, errorf(connect.CodeInvalidArgument, "owner pattern %q: %v", raw, err)
		}
		st.patterns = append(st.patterns, p)
	}
	if st.eval, err = he.NewEvaluator(params, nil, he.WithWorkers(1)); err != nil {
		return nil, keys.ConnectError(err)
	}
	return st, nil
}

// bins returns the number of histogram bins per coordinate (0: no histogram).
func bins(m *analyticsv1.Study) int { return max(len(m.GetHistogramEdges())-1, 0) }

// histogramLen returns the length of a study's histogram vector.
func histogramLen(m *analyticsv1.Study) int { return int(m.GetDimension()) * bins(m) }

func checkEdges(edges []float64) error {
	if len(edges) == 1 {
		return errorf(connect.CodeInvalidArgument, "a histogram needs at least two edges")
	}
	for i := 1; i < len(edges); i++ {
		if !(edges[i] > edges[i-1]) {
			return errorf(connect.CodeInvalidArgument, "histogram edges must increase strictly (edge %d)", i)
		}
	}
	return nil
}

// checkRanges checks the declared ranges: one for every coordinate or one per
// coordinate, each with min < max; required when creating.
func checkRanges(m *analyticsv1.Study, required bool) error {
	rs := m.GetRanges()
	if len(rs) == 0 && !required {
		return nil
	}
	if len(rs) != 1 && len(rs) != int(m.GetDimension()) {
		return errorf(connect.CodeInvalidArgument, "a study declares one range or one per coordinate (%d), not %d", m.GetDimension(), len(rs))
	}
	for i, r := range rs {
		if !(r.GetMin() < r.GetMax()) || math.IsInf(r.GetMin(), 0) || math.IsInf(r.GetMax(), 0) {
			return errorf(connect.CodeInvalidArgument, "range %d must have finite min < max", i)
		}
	}
	return nil
}

func (st *study) isOwner(id spiffeid.ID) bool {
	for _, p := range st.patterns {
		if p.Match(id) {
			return true
		}
	}
	return false
}

func (st *study) isAnalyst(id spiffeid.ID) bool { return st.meta.GetAnalyst() == id.String() }

// lookup returns a study, from memory or, when a store is shared, from the store (a
// study created through another replica). A missing study is nil without error.
func (s *Service) lookup(ctx context.Context, id string) (*study, error) {
	s.mu.Lock()
	st := s.studies[id]
	s.mu.Unlock()
	if st != nil || s.cfg.store == nil {
		return st, nil
	}
	sctx, cancel := s.storeCtx(ctx)
	defer cancel()
	b, err := s.cfg.store.Study(sctx, id)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, unavailable()
	}
	m := &analyticsv1.Study{}
	if err := proto.Unmarshal(b, m); err != nil || m.GetStudyId() != id {
		return nil, errorf(connect.CodeInternal, "stored study %q is corrupt", id)
	}
	if st, err = s.newStudy(m, false); err != nil {
		return nil, errorf(connect.CodeInternal, "stored study %q: %v", id, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if prev, ok := s.studies[id]; ok {
		return prev, nil
	}
	s.studies[id] = st
	return st, nil
}

// authorize is the prologue of every call on an existing study: the verified caller and
// the study studyID, if may lets the caller do what to it. A study that does not exist gets
// the same answer as one the caller may not use ([denied]).
func (s *Service) authorize(ctx context.Context, studyID, what string, may func(*study, spiffeid.ID) bool) (*study, spiffeid.ID, error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, spiffeid.ID{}, err
	}
	st, err := s.lookup(ctx, studyID)
	if err != nil {
		return nil, spiffeid.ID{}, err
	}
	if st == nil || !may(st, who) {
		return nil, spiffeid.ID{}, denied(who, what, studyID)
	}
	return st, who, nil
}

// mayContribute reports whether id may submit to the study: an owner that is not its
// analyst. An analyst counted as one of the min_owners distinct owners would close with one
// real owner and subtract its own sums from the result (docs/services.md).
func (st *study) mayContribute(id spiffeid.ID) bool { return st.isOwner(id) && !st.isAnalyst(id) }

// isAnalystOrOwner reports whether id may read the study's metadata.
func (st *study) isAnalystOrOwner(id spiffeid.ID) bool { return st.isAnalyst(id) || st.isOwner(id) }

// denied is the one answer for a study that does not exist and for one the caller
// may not use, so that callers cannot probe which studies exist.
func denied(who spiffeid.ID, what, studyID string) error {
	return errorf(connect.CodePermissionDenied, "%s may not %s study %q (or it does not exist)", who, what, studyID)
}

// CreateStudy registers a study with the caller as its analyst.
func (s *Service) CreateStudy(ctx context.Context, req *connect.Request[analyticsv1.CreateStudyRequest]) (*connect.Response[analyticsv1.CreateStudyResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	m := proto.CloneOf(req.Msg.GetStudy())
	m.Analyst = who.String()
	m.State = analyticsv1.StudyState_STUDY_STATE_UNSPECIFIED
	st, err := s.newStudy(m, true)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.studies[m.GetStudyId()]; ok {
		return nil, errorf(connect.CodeAlreadyExists, "study %q already exists", m.GetStudyId())
	}
	if s.cfg.store != nil {
		b, err := proto.Marshal(m)
		if err != nil {
			return nil, errorf(connect.CodeInternal, "encoding the study")
		}
		sctx, cancel := s.storeCtx(ctx)
		err = s.cfg.store.CreateStudy(sctx, m.GetStudyId(), b)
		cancel()
		if errors.Is(err, fs.ErrExist) {
			return nil, errorf(connect.CodeAlreadyExists, "study %q already exists", m.GetStudyId())
		}
		if err != nil {
			return nil, unavailable()
		}
	}
	s.studies[m.GetStudyId()] = st
	return connect.NewResponse(&analyticsv1.CreateStudyResponse{Study: st.view()}), nil
}

// GetStudy returns a study to its analyst and its owners.
func (s *Service) GetStudy(ctx context.Context, req *connect.Request[analyticsv1.GetStudyRequest]) (*connect.Response[analyticsv1.GetStudyResponse], error) {
	st, _, err := s.authorize(ctx, req.Msg.GetStudyId(), "read", (*study).isAnalystOrOwner)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&analyticsv1.GetStudyResponse{Study: st.view()}), nil
}

// view returns the study's metadata with its current state.
func (st *study) view() *analyticsv1.Study {
	st.mu.Lock()
	defer st.mu.Unlock()
	m := proto.CloneOf(st.meta)
	m.State = st.state()
	if st.com != nil && st.com.collectiveMsg != nil {
		m.PublicKey = st.com.collectiveMsg
	}
	return m
}

// dedupName names a submission by owner and idempotency key. Owners are SPIFFE IDs,
// so no submission name collides with the lifecycle records' names.
func dedupName(owner, key string) string {
	h := sha256.Sum256([]byte(owner + "\x00" + key))
	return hex.EncodeToString(h[:])
}

// closeName names a study's one close record.
func closeName(studyID string) string {
	h := sha256.Sum256([]byte("veil-analytics-closed\x00" + studyID))
	return hex.EncodeToString(h[:])
}

// releaseName names a study's release record number seq.
func releaseName(studyID string, seq uint64) string {
	h := sha256.Sum256(fmt.Appendf(nil, "veil-analytics-released\x00%s\x00%d", studyID, seq))
	return hex.EncodeToString(h[:])
}

// Submit adds one owner's contribution, once per (owner, idempotency key), while the
// study is open and the owner below its cap.
func (s *Service) Submit(ctx context.Context, req *connect.Request[analyticsv1.SubmitRequest]) (*connect.Response[analyticsv1.SubmitResponse], error) {
	st, who, err := s.authorize(ctx, req.Msg.GetStudyId(), "submit to", (*study).mayContribute)
	if err != nil {
		return nil, err
	}
	dup, n, err := s.add(ctx, st, who.String(), req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&analyticsv1.SubmitResponse{Duplicate: dup, Submissions: n}), nil
}

// submission is one owner's contribution, decoded and validated.
type submission struct {
	sum, prod, hist *he.Vector
	count           uint64
}

// check decodes and validates a submission against the study. stored is set for a
// record read back from the store (see decode).
func (st *study) check(req *analyticsv1.SubmitRequest, stored bool) (*submission, error) {
	sum, err := st.decode(req.GetSums(), int(st.meta.GetDimension()), "sums", stored)
	if err != nil {
		return nil, err
	}
	prod, err := st.decode(req.GetProducts(), productsLen(st.meta), "products", stored)
	if err != nil {
		return nil, err
	}
	var hist *he.Vector
	switch {
	case bins(st.meta) > 0:
		if hist, err = st.decode(req.GetHistogram(), histogramLen(st.meta), "histogram", stored); err != nil {
			return nil, err
		}
	case req.GetHistogram() != nil:
		return nil, errorf(connect.CodeInvalidArgument, "the study has no histogram")
	}
	if req.GetCount() < 1 {
		return nil, errorf(connect.CodeInvalidArgument, "a submission counts at least one record")
	}
	return &submission{sum: sum, prod: prod, hist: hist, count: req.GetCount()}, nil
}

// add validates one submission, adds it to a copy of the aggregate, stores it (the
// store decides, atomically across replicas, whether its idempotency key is new) and
// only then makes the copy the aggregate: nothing is stored that cannot be counted. It
// returns the owner's own counted submissions, never the study's: an owner learns
// nothing of other owners, not even when they submit (review finding D).
func (s *Service) add(ctx context.Context, st *study, owner string, req *analyticsv1.SubmitRequest) (duplicate bool, mine uint64, err error) {
	sub, err := st.check(req, false)
	if err != nil {
		return false, 0, err
	}
	name := dedupName(owner, req.GetIdempotencyKey())
	st.mu.Lock()
	defer st.mu.Unlock()
	// No listing of the store here (it would cost I/O per submission): the store's
	// atomic add decides whether the key is new; only a duplicate makes this replica
	// catch up with what the others stored. GetResult always catches up first.
	if _, ok := st.counted[name]; ok {
		// The first submission with this key stands; a retry (re-encrypted, so its
		// bytes differ) is acknowledged without being counted again.
		return true, uint64(st.perOwner[owner]), nil
	}
	if st.closed != nil {
		return false, 0, errorf(connect.CodeFailedPrecondition, "study %q is closed", st.meta.GetStudyId())
	}
	if st.perOwner[owner] >= st.maxPerOwner() {
		return false, 0, errorf(connect.CodeResourceExhausted, "study %q counts at most %d submissions per owner", st.meta.GetStudyId(), st.maxPerOwner())
	}
	next, err := st.sumWith(ctx, sub)
	if err != nil {
		return false, 0, err
	}
	if s.cfg.store != nil {
		b, err := proto.Marshal(&analyticsv1.StoredSubmission{Owner: owner, Request: req})
		if err != nil {
			return false, 0, errorf(connect.CodeInternal, "encoding a submission")
		}
		sctx, cancel := s.storeCtx(ctx)
		added, err := s.cfg.store.AddSubmission(sctx, st.meta.GetStudyId(), name, b)
		cancel()
		if err != nil {
			return false, 0, unavailable()
		}
		if !added {
			// Another replica stored this key first: count its copy, not this one.
			if err := s.syncLocked(ctx, st); err != nil {
				return false, 0, err
			}
			return true, uint64(st.perOwner[owner]), nil
		}
	}
	st.commitLocked(name, owner, next)
	return false, uint64(st.perOwner[owner]), nil
}

// aggregate is a study's running sums.
type aggregate struct {
	sum, prod, hist *he.Vector
	count           uint64
}

// sumWith returns the aggregate with sub added, leaving the study unchanged. st.mu is
// held.
func (st *study) sumWith(ctx context.Context, sub *submission) (*aggregate, error) {
	next := &aggregate{sum: sub.sum, prod: sub.prod, hist: sub.hist, count: st.count + sub.count}
	if st.sum == nil {
		return next, nil
	}
	var err error
	if next.sum, err = st.eval.Add(ctx, st.sum, sub.sum); err != nil {
		return nil, keys.ConnectError(err)
	}
	if next.prod, err = st.eval.Add(ctx, st.products, sub.prod); err != nil {
		return nil, keys.ConnectError(err)
	}
	if sub.hist != nil {
		if next.hist, err = st.eval.Add(ctx, st.histogram, sub.hist); err != nil {
			return nil, keys.ConnectError(err)
		}
	}
	return next, nil
}

// commitLocked makes next the aggregate, counting submission name of owner.
func (st *study) commitLocked(name, owner string, next *aggregate) {
	st.sum, st.products, st.histogram, st.count = next.sum, next.prod, next.hist, next.count
	st.submissions++
	st.seen[name] = true
	st.counted[name] = owner
	st.perOwner[owner]++
}

// reset forgets the aggregate (before recounting the set a close fixed).
func (st *study) reset() {
	st.sum, st.products, st.histogram, st.count, st.submissions = nil, nil, nil, 0, 0
	st.counted, st.perOwner = map[string]string{}, map[string]int{}
	for name := range st.seen {
		if !st.closed[name] {
			continue
		}
		delete(st.seen, name)
	}
}

// quarantine logs a stored record that cannot be counted and never reads it again.
func (s *Service) quarantine(st *study, name, why string) {
	st.seen[name] = true
	s.cfg.logger.Warn("analytics: stored record quarantined", "study", st.meta.GetStudyId(), "record", name[:12], "reason", why)
}

// syncLocked counts the study's stored records this process has not read yet: those
// written by other replicas sharing the store, or before a restart. A record that is
// corrupt or cannot be counted is quarantined, never an error. st.mu is held.
func (s *Service) syncLocked(ctx context.Context, st *study) error {
	if s.cfg.store == nil {
		return nil
	}
	sctx, cancel := s.storeCtx(ctx)
	defer cancel()
	id := st.meta.GetStudyId()
	names, err := s.cfg.store.Submissions(sctx, id)
	if err != nil {
		return unavailable()
	}
	type pending struct {
		name string
		rec  *analyticsv1.StoredSubmission
	}
	var subs []pending
	var closed *analyticsv1.StudyClosed
	var com []storedRecord // committee joins, Shamir shares and release shares
	for _, name := range names {
		if st.seen[name] {
			continue
		}
		b, err := s.cfg.store.Submission(sctx, id, name)
		if err != nil {
			return unavailable()
		}
		rec := &analyticsv1.StoredSubmission{}
		switch {
		case proto.Unmarshal(b, rec) != nil:
			s.quarantine(st, name, "undecodable")
		case rec.GetClosed() != nil && name == closeName(id):
			closed = rec.GetClosed()
			st.seen[name] = true
		case rec.GetReleased() != nil && name == releaseName(id, rec.GetReleased().GetSequence()):
			st.releases = max(st.releases, rec.GetReleased().GetSequence())
			st.seen[name] = true
		case rec.GetRequest() != nil && dedupName(rec.GetOwner(), rec.GetRequest().GetIdempotencyKey()) == name:
			subs = append(subs, pending{name, rec})
		case st.com != nil && (rec.GetJoin() != nil || rec.GetShamir() != nil || rec.GetReleaseShare() != nil || rec.GetRoundNoise() != nil):
			com = append(com, storedRecord{name, rec})
		default:
			s.quarantine(st, name, "name does not match the record")
		}
	}
	// Setup first: the collective key decides which submissions decode.
	s.applySetupLocked(st, com)
	if closed != nil && st.closed == nil {
		st.closed = map[string]bool{}
		for _, n := range closed.GetIncluded() {
			st.closed[n] = true
		}
		// This replica may have counted submissions the close left out: recount
		// exactly the fixed set.
		for n := range st.counted {
			if !st.closed[n] {
				st.reset()
				return s.syncLocked(ctx, st)
			}
		}
	}
	for _, p := range subs {
		owner := p.rec.GetOwner()
		if st.closed != nil && !st.closed[p.name] {
			st.seen[p.name] = true // stored after the close, or over the cap: not counted
			continue
		}
		if st.closed == nil && st.perOwner[owner] >= st.maxPerOwner() {
			st.seen[p.name] = true // over the cap (a race between replicas)
			continue
		}
		sub, err := st.check(p.rec.GetRequest(), true)
		if err != nil {
			s.quarantine(st, p.name, err.Error())
			continue
		}
		next, err := st.sumWith(ctx, sub)
		if err != nil {
			s.quarantine(st, p.name, err.Error())
			continue
		}
		st.commitLocked(p.name, owner, next)
	}
	// Release shares last: they decode against the closed aggregate.
	s.applyReleaseSharesLocked(st, com)
	return nil
}

// decode validates one submitted vector: the study's parameters, the right length,
// the study's key and a fresh encryption (top level, default scale), so that it adds
// to any other.
//
// The key is checked by the vector's fingerprint (he.PublicKey.Fingerprint), before
// anything is added or stored: a vector under another key would turn the aggregate
// into garbage (and, once added, make every honest submission after it fail the
// evaluator's own fingerprint check). A submitted vector without a fingerprint is
// refused too: the he layer accepts one (an older sender it cannot check), but this
// service knows the one key every vector must be under, and its owners' client always
// names it. A record read back from the store (stored) may lack one: it was counted
// by an earlier version before fingerprints existed, and dropping it would change a
// closed study's result; a stored record naming another key is quarantined.
func (st *study) decode(m *hev1.EncryptedVector, want int, what string, stored bool) (*he.Vector, error) {
	if m.GetLength() != uint64(want) {
		return nil, errorf(connect.CodeInvalidArgument, "%s holds %d values, the study needs %d", what, m.GetLength(), want)
	}
	keyFP := st.keyFP.Load()
	if keyFP == nil {
		return nil, errorf(connect.CodeFailedPrecondition, "study %q has no collective key yet: every committee member must join first", st.meta.GetStudyId())
	}
	switch fp := m.GetKeyFingerprint(); {
	case len(fp) == 0 && !stored:
		return nil, errorf(connect.CodeInvalidArgument, "%s carries no key fingerprint: the study needs vectors that name its public key", what)
	case len(fp) != 0 && !bytes.Equal(fp, *keyFP):
		return nil, errorf(connect.CodeFailedPrecondition, "%s is encrypted under key %x, not the study's public key %x", what, fp, *keyFP)
	}
	v, err := he.UnmarshalVector(st.params, m)
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	if !v.Fresh() {
		return nil, errorf(connect.CodeInvalidArgument, "%s must be a fresh encryption: top level and the default scale", what)
	}
	return v, nil
}

// CloseStudy fixes the set of counted submissions, once there are enough owners.
func (s *Service) CloseStudy(ctx context.Context, req *connect.Request[analyticsv1.CloseStudyRequest]) (*connect.Response[analyticsv1.CloseStudyResponse], error) {
	id := req.Msg.GetStudyId()
	st, _, err := s.authorize(ctx, id, "close", (*study).isAnalyst)
	if err != nil {
		return nil, err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := s.syncLocked(ctx, st); err != nil {
		return nil, err
	}
	if st.closed == nil {
		owners := len(st.perOwner)
		if owners < st.minOwners() {
			return nil, errorf(connect.CodeFailedPrecondition, "study %q has submissions from %d distinct owners, a close needs %d", id, owners, st.minOwners())
		}
		included := make([]string, 0, len(st.counted))
		for n := range st.counted {
			included = append(included, n)
		}
		slices.Sort(included)
		if s.cfg.store != nil {
			b, err := proto.Marshal(&analyticsv1.StoredSubmission{Closed: &analyticsv1.StudyClosed{Included: included, UnixSeconds: time.Now().Unix()}})
			if err != nil {
				return nil, errorf(connect.CodeInternal, "encoding the close")
			}
			sctx, cancel := s.storeCtx(ctx)
			added, err := s.cfg.store.AddSubmission(sctx, id, closeName(id), b)
			cancel()
			if err != nil {
				return nil, unavailable()
			}
			if !added { // another replica closed first: adopt its set
				if err := s.syncLocked(ctx, st); err != nil {
					return nil, err
				}
			}
		}
		if st.closed == nil {
			st.closed = map[string]bool{}
			for _, n := range included {
				st.closed[n] = true
			}
			st.seen[closeName(id)] = true
		}
	}
	return connect.NewResponse(&analyticsv1.CloseStudyResponse{Submissions: st.submissions, Owners: uint32(len(st.perOwner))}), nil
}

// recordRelease stores the next release record and returns its sequence number.
// st.mu is held.
func (s *Service) recordRelease(ctx context.Context, st *study, reader string) (uint64, error) {
	id := st.meta.GetStudyId()
	for range 16 {
		seq := st.releases + 1
		if s.cfg.store != nil {
			b, err := proto.Marshal(&analyticsv1.StoredSubmission{Released: &analyticsv1.StudyReleased{Sequence: seq, Reader: reader, UnixSeconds: time.Now().Unix()}})
			if err != nil {
				return 0, errorf(connect.CodeInternal, "encoding a release")
			}
			sctx, cancel := s.storeCtx(ctx)
			added, err := s.cfg.store.AddSubmission(sctx, id, releaseName(id, seq), b)
			cancel()
			if err != nil {
				return 0, unavailable()
			}
			if !added { // another replica took seq: catch up and take the next
				if err := s.syncLocked(ctx, st); err != nil {
					return 0, err
				}
				continue
			}
			st.seen[releaseName(id, seq)] = true
		}
		st.releases = seq
		s.cfg.logger.Info("analytics: release", "study", id, "sequence", seq, "reader", reader, "submissions", st.submissions)
		return seq, nil
	}
	return 0, unavailable()
}

// GetResult returns the encrypted aggregate of a closed study to its analyst and
// records the release.
func (s *Service) GetResult(ctx context.Context, req *connect.Request[analyticsv1.GetResultRequest]) (*connect.Response[analyticsv1.GetResultResponse], error) {
	st, who, err := s.authorize(ctx, req.Msg.GetStudyId(), "read the result of", (*study).isAnalyst)
	if err != nil {
		return nil, err
	}
	st.mu.Lock()
	if err := s.syncLocked(ctx, st); err != nil {
		st.mu.Unlock()
		return nil, err
	}
	if st.closed == nil {
		st.mu.Unlock()
		return nil, errorf(connect.CodeFailedPrecondition, "study %q is open: close it before reading its result", req.Msg.GetStudyId())
	}
	sum, prod, hist, count, n := st.sum, st.products, st.histogram, st.count, st.submissions
	if n == 0 {
		st.mu.Unlock()
		return nil, errorf(connect.CodeFailedPrecondition, "study %q has no submissions", req.Msg.GetStudyId())
	}
	if st.com != nil {
		res, err := s.committeeResultLocked(ctx, st, who.String())
		st.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return connect.NewResponse(res), nil
	}
	if !st.budgetLeft() {
		st.mu.Unlock()
		return nil, errorf(connect.CodeResourceExhausted, "study %q: its privacy budget (epsilon %g, %g per release) is spent after %d releases", req.Msg.GetStudyId(), st.meta.GetPrivacy().GetEpsilon(), st.meta.GetPrivacy().GetEpsilonPerRelease(), st.releases)
	}
	seq, err := s.recordRelease(ctx, st, who.String())
	st.mu.Unlock()
	if err != nil {
		return nil, err
	}
	// With privacy, fresh Laplace noise for this release (recorded first: a failure
	// here spends budget and releases nothing).
	if sum, prod, hist, err = st.privateRelease(ctx, sum, prod, hist); err != nil {
		return nil, err
	}
	res := &analyticsv1.GetResultResponse{Submissions: n, Count: count, Release: seq}
	type part struct {
		v   *he.Vector
		dst **hev1.EncryptedVector
	}
	out := []part{{sum, &res.Sum}, {prod, &res.SumProducts}}
	if !req.Msg.GetSumsOnly() {
		// A reader from before sums_only decrypts the mean and second moments the
		// server computes; a current one divides the sums by count in the clear.
		mean, err := st.eval.MulScalar(ctx, sum, 1/float64(count))
		if err != nil {
			return nil, keys.ConnectError(err)
		}
		second, err := st.eval.MulScalar(ctx, prod, 1/float64(count))
		if err != nil {
			return nil, keys.ConnectError(err)
		}
		out = append(out, part{mean, &res.Mean}, part{second, &res.SecondMoment})
	}
	for _, f := range out {
		if *f.dst, err = he.MarshalVector(f.v); err != nil {
			return nil, keys.ConnectError(err)
		}
	}
	if hist != nil {
		if res.Histogram, err = he.MarshalVector(hist); err != nil {
			return nil, keys.ConnectError(err)
		}
	}
	return connect.NewResponse(res), nil
}

// load reads every stored study and counts its submissions. A study that cannot be
// read is logged and skipped; only an unreachable store fails.
func (s *Service) load() error {
	ctx, cancel := s.storeCtx(context.Background())
	defer cancel()
	ids, err := s.cfg.store.Studies(ctx)
	if err != nil {
		return fmt.Errorf("analytics: store: %w", err)
	}
	for _, id := range ids {
		st, err := s.lookup(ctx, id)
		if connect.CodeOf(err) == connect.CodeUnavailable {
			return fmt.Errorf("analytics: store: study %s: %w", id, err)
		}
		if err != nil {
			s.cfg.logger.Warn("analytics: stored study quarantined", "study", id, "reason", err.Error())
			continue
		}
		if st == nil {
			continue
		}
		st.mu.Lock()
		err = s.syncLocked(ctx, st)
		st.mu.Unlock()
		if err != nil {
			return fmt.Errorf("analytics: store: study %s: %w", id, err)
		}
	}
	return nil
}
