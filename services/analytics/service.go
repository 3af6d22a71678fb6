// Package analytics is encrypted aggregation for many data owners (veil.analytics.v1).
//
// An analyst creates a study with a CKKS public key and the SPIFFE ID patterns of
// the owners allowed to contribute. Each owner sums its records locally, encrypts
// the per-coordinate sums and the sums of squares (or of all pairwise products, for a
// covariance study), and optionally its per-bin record counts, under the analyst's
// public key, and submits them with its record count. The service adds the ciphertexts up and scales them by 1/count into an
// encrypted mean and encrypted second moments. It holds no secret key and no
// evaluation key: additions and a plaintext scalar product need none. Only the
// analyst may fetch the result; the analyst's client decrypts it and derives
// variance and covariance (second moment minus the product of means).
//
// Submissions are durable with a Store (WithStore: one file per submission, written
// atomically, 0600; WithStudyStore: a shared store such as NATS JetStream, so that
// replicas share studies and submissions) and idempotent: the same owner and
// idempotency key count once, across replicas too.
// See docs/services.md for what the service learns.
package analytics

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// Procedure names, for policies and read limits.
const (
	CreateStudyProcedure = analyticsv1connect.AnalyticsServiceCreateStudyProcedure
	GetStudyProcedure    = analyticsv1connect.AnalyticsServiceGetStudyProcedure
	SubmitProcedure      = analyticsv1connect.AnalyticsServiceSubmitProcedure
	GetResultProcedure   = analyticsv1connect.AnalyticsServiceGetResultProcedure
)

// Option configures New.
type Option func(*config)

type config struct {
	dir     string
	store   Store
	timeout time.Duration
	params  []*he.Parameters
}

// WithStore keeps studies and submissions in dir (a DirStore, created 0700), so that a
// restarted service keeps them. Without a store they live in memory only.
func WithStore(dir string) Option { return func(c *config) { c.dir = dir } }

// WithStudyStore keeps studies and submissions in store, which replicas may share.
// Every store operation is bounded by timeout (default 30 seconds).
func WithStudyStore(store Store, timeout time.Duration) Option {
	return func(c *config) { c.store, c.timeout = store, timeout }
}

// WithParameters sets the parameter sets studies may use (default he.Presets()).
func WithParameters(ps ...*he.Parameters) Option { return func(c *config) { c.params = ps } }

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

	sum, products *he.Vector
	histogram     *he.Vector // nil unless the study has histogram edges
	count         uint64
	submissions   uint64
	seen          map[string]bool // dedupName of every counted submission
}

// New returns the service, loading every study and submission from the store.
func New(opts ...Option) (*Service, error) {
	cfg := config{params: he.Presets()}
	for _, o := range opts {
		o(&cfg)
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
// products, histogram).
func ReadLimits(params *he.Parameters) map[string]int64 {
	lit := params.Literal()
	pk := int64(2*(len(lit.LogQ)+len(lit.LogP))*params.N()*8) + 64<<10
	return map[string]int64{
		CreateStudyProcedure: pk,
		SubmitProcedure:      3*he.MaxVectorWireSize(params, params.Slots()) + 4096,
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

// newStudy checks a study's metadata and builds its in-memory state.
func (s *Service) newStudy(m *analyticsv1.Study) (*study, error) {
	params, err := s.paramsByID(m.GetPublicKey().GetParamId())
	if err != nil {
		return nil, err
	}
	if _, err := he.UnmarshalPublicKey(params, m.GetPublicKey()); err != nil {
		return nil, he.ConnectError(err)
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
	st := &study{meta: m, params: params, seen: map[string]bool{}}
	for _, raw := range m.GetOwnerPatterns() {
		p, err := transport.ParsePattern(raw)
		if err != nil {
			return nil, errorf(connect.CodeInvalidArgument, "owner pattern %q: %v", raw, err)
		}
		st.patterns = append(st.patterns, p)
	}
	if st.eval, err = he.NewEvaluator(params, nil, he.WithWorkers(1)); err != nil {
		return nil, he.ConnectError(err)
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
	if st, err = s.newStudy(m); err != nil {
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
	st, err := s.newStudy(m)
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
	return connect.NewResponse(&analyticsv1.CreateStudyResponse{Study: m}), nil
}

// GetStudy returns a study to its analyst and its owners.
func (s *Service) GetStudy(ctx context.Context, req *connect.Request[analyticsv1.GetStudyRequest]) (*connect.Response[analyticsv1.GetStudyResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	st, err := s.lookup(ctx, req.Msg.GetStudyId())
	if err != nil {
		return nil, err
	}
	if st == nil || (!st.isAnalyst(who) && !st.isOwner(who)) {
		return nil, denied(who, "read", req.Msg.GetStudyId())
	}
	return connect.NewResponse(&analyticsv1.GetStudyResponse{Study: st.meta}), nil
}

// dedupName names a submission by owner and idempotency key.
func dedupName(owner, key string) string {
	h := sha256.Sum256([]byte(owner + "\x00" + key))
	return hex.EncodeToString(h[:])
}

// Submit adds one owner's contribution, once per (owner, idempotency key).
func (s *Service) Submit(ctx context.Context, req *connect.Request[analyticsv1.SubmitRequest]) (*connect.Response[analyticsv1.SubmitResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	st, err := s.lookup(ctx, req.Msg.GetStudyId())
	if err != nil {
		return nil, err
	}
	if st == nil || !st.isOwner(who) {
		return nil, denied(who, "submit to", req.Msg.GetStudyId())
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

// check decodes and validates a submission against the study.
func (st *study) check(req *analyticsv1.SubmitRequest) (*submission, error) {
	sum, err := st.decode(req.GetSums(), int(st.meta.GetDimension()), "sums")
	if err != nil {
		return nil, err
	}
	prod, err := st.decode(req.GetProducts(), productsLen(st.meta), "products")
	if err != nil {
		return nil, err
	}
	var hist *he.Vector
	switch {
	case bins(st.meta) > 0:
		if hist, err = st.decode(req.GetHistogram(), histogramLen(st.meta), "histogram"); err != nil {
			return nil, err
		}
	case req.GetHistogram() != nil:
		return nil, errorf(connect.CodeInvalidArgument, "the study has no histogram")
	}
	return &submission{sum: sum, prod: prod, hist: hist, count: req.GetCount()}, nil
}

// add validates one submission, stores it (the store decides, atomically across
// replicas, whether its idempotency key is new) and counts it.
func (s *Service) add(ctx context.Context, st *study, owner string, req *analyticsv1.SubmitRequest) (duplicate bool, submissions uint64, err error) {
	sub, err := st.check(req)
	if err != nil {
		return false, 0, err
	}
	name := dedupName(owner, req.GetIdempotencyKey())
	st.mu.Lock()
	defer st.mu.Unlock()
	// No listing of the store here (it would cost I/O per submission): the store's
	// atomic add decides whether the key is new; only a duplicate makes this replica
	// catch up with what the others stored. GetResult always catches up first.
	if st.seen[name] {
		// The first submission with this key stands; a retry (re-encrypted, so its
		// bytes differ) is acknowledged without being counted again.
		return true, st.submissions, nil
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
			return true, st.submissions, nil
		}
	}
	if err := st.applyLocked(ctx, name, sub); err != nil {
		return false, 0, err
	}
	return false, st.submissions, nil
}

// applyLocked adds a validated submission to the study's aggregate. st.mu is held.
func (st *study) applyLocked(ctx context.Context, name string, sub *submission) error {
	newSum, newProd, newHist := sub.sum, sub.prod, sub.hist
	if st.sum != nil {
		var err error
		if newSum, err = st.eval.Add(ctx, st.sum, sub.sum); err != nil {
			return he.ConnectError(err)
		}
		if newProd, err = st.eval.Add(ctx, st.products, sub.prod); err != nil {
			return he.ConnectError(err)
		}
		if sub.hist != nil {
			if newHist, err = st.eval.Add(ctx, st.histogram, sub.hist); err != nil {
				return he.ConnectError(err)
			}
		}
	}
	st.sum, st.products, st.histogram = newSum, newProd, newHist
	st.count += sub.count
	st.submissions++
	st.seen[name] = true
	return nil
}

// syncLocked counts the study's stored submissions this process has not counted yet:
// those received by other replicas sharing the store. st.mu is held.
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
	for _, name := range names {
		if st.seen[name] {
			continue
		}
		b, err := s.cfg.store.Submission(sctx, id, name)
		if err != nil {
			return unavailable()
		}
		rec := &analyticsv1.StoredSubmission{}
		if err := proto.Unmarshal(b, rec); err != nil || dedupName(rec.GetOwner(), rec.GetRequest().GetIdempotencyKey()) != name {
			return errorf(connect.CodeInternal, "stored submission %.12s of study %q is corrupt", name, id)
		}
		sub, err := st.check(rec.GetRequest())
		if err != nil {
			return errorf(connect.CodeInternal, "stored submission %.12s of study %q: %v", name, id, err)
		}
		if err := st.applyLocked(ctx, name, sub); err != nil {
			return err
		}
	}
	return nil
}

// decode validates one submitted vector: the study's parameters, the right length,
// and a level left for the scaling by 1/count.
func (st *study) decode(m *hev1.EncryptedVector, want int, what string) (*he.Vector, error) {
	if m.GetLength() != uint64(want) {
		return nil, errorf(connect.CodeInvalidArgument, "%s holds %d values, the study needs %d", what, m.GetLength(), want)
	}
	v, err := he.UnmarshalVector(st.params, m)
	if err != nil {
		return nil, he.ConnectError(err)
	}
	if v.Level() < 1 {
		return nil, errorf(connect.CodeInvalidArgument, "%s are at level 0: the mean needs one level", what)
	}
	return v, nil
}

// GetResult returns the encrypted aggregate to the study's analyst.
func (s *Service) GetResult(ctx context.Context, req *connect.Request[analyticsv1.GetResultRequest]) (*connect.Response[analyticsv1.GetResultResponse], error) {
	who, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	st, err := s.lookup(ctx, req.Msg.GetStudyId())
	if err != nil {
		return nil, err
	}
	if st == nil || !st.isAnalyst(who) {
		return nil, denied(who, "read the result of", req.Msg.GetStudyId())
	}
	st.mu.Lock()
	if err := s.syncLocked(ctx, st); err != nil {
		st.mu.Unlock()
		return nil, err
	}
	sum, prod, hist, count, n := st.sum, st.products, st.histogram, st.count, st.submissions
	st.mu.Unlock()
	if n == 0 {
		return nil, errorf(connect.CodeFailedPrecondition, "study %q has no submissions yet", req.Msg.GetStudyId())
	}
	mean, err := st.eval.MulScalar(ctx, sum, 1/float64(count))
	if err != nil {
		return nil, he.ConnectError(err)
	}
	second, err := st.eval.MulScalar(ctx, prod, 1/float64(count))
	if err != nil {
		return nil, he.ConnectError(err)
	}
	res := &analyticsv1.GetResultResponse{Submissions: n, Count: count}
	for _, f := range []struct {
		v   *he.Vector
		dst **hev1.EncryptedVector
	}{{sum, &res.Sum}, {prod, &res.SumProducts}, {mean, &res.Mean}, {second, &res.SecondMoment}} {
		if *f.dst, err = he.MarshalVector(f.v); err != nil {
			return nil, he.ConnectError(err)
		}
	}
	if hist != nil {
		if res.Histogram, err = he.MarshalVector(hist); err != nil {
			return nil, he.ConnectError(err)
		}
	}
	return connect.NewResponse(res), nil
}

// load reads every stored study and counts its submissions.
func (s *Service) load() error {
	ctx, cancel := s.storeCtx(context.Background())
	defer cancel()
	ids, err := s.cfg.store.Studies(ctx)
	if err != nil {
		return fmt.Errorf("analytics: store: %w", err)
	}
	for _, id := range ids {
		st, err := s.lookup(ctx, id)
		if err != nil {
			return fmt.Errorf("analytics: store: study %s: %w", id, err)
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
