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
// Submissions are durable with WithStore (one file per submission, written
// atomically, 0600) and idempotent: the same owner and idempotency key count once.
// See docs/services.md for what the service learns.
package analytics

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/internal/atomicfile"
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
	dir    string
	params []*he.Parameters
}

// WithStore keeps studies and submissions in dir (created 0700), so that a restarted
// service keeps them. Without it they live in memory only.
func WithStore(dir string) Option { return func(c *config) { c.dir = dir } }

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
	dir      string

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
	s := &Service{cfg: cfg, studies: map[string]*study{}}
	if cfg.dir == "" {
		return s, nil
	}
	if err := os.MkdirAll(cfg.dir, 0o700); err != nil {
		return nil, fmt.Errorf("analytics: store: %w", err)
	}
	if err := s.load(); err != nil {
		return nil, err
	}
	return s, nil
}

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
	if s.cfg.dir != "" {
		st.dir = filepath.Join(s.cfg.dir, m.GetStudyId())
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

func (s *Service) lookup(id string) *study {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.studies[id]
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
	if st.dir != "" {
		if err := st.saveMeta(); err != nil {
			return nil, err
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
	st := s.lookup(req.Msg.GetStudyId())
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
	st := s.lookup(req.Msg.GetStudyId())
	if st == nil || !st.isOwner(who) {
		return nil, denied(who, "submit to", req.Msg.GetStudyId())
	}
	dup, n, err := st.add(ctx, who.String(), req.Msg, true)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&analyticsv1.SubmitResponse{Duplicate: dup, Submissions: n}), nil
}

// add validates and counts one submission; persist writes it to the store first.
func (st *study) add(ctx context.Context, owner string, req *analyticsv1.SubmitRequest, persist bool) (duplicate bool, submissions uint64, err error) {
	sum, err := st.decode(req.GetSums(), int(st.meta.GetDimension()), "sums")
	if err != nil {
		return false, 0, err
	}
	prod, err := st.decode(req.GetProducts(), productsLen(st.meta), "products")
	if err != nil {
		return false, 0, err
	}
	var hist *he.Vector
	switch {
	case bins(st.meta) > 0:
		if hist, err = st.decode(req.GetHistogram(), histogramLen(st.meta), "histogram"); err != nil {
			return false, 0, err
		}
	case req.GetHistogram() != nil:
		return false, 0, errorf(connect.CodeInvalidArgument, "the study has no histogram")
	}
	name := dedupName(owner, req.GetIdempotencyKey())
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.seen[name] {
		// The first submission with this key stands; a retry (re-encrypted, so its
		// bytes differ) is acknowledged without being counted again.
		return true, st.submissions, nil
	}
	newSum, newProd, newHist := sum, prod, hist
	if st.sum != nil {
		if newSum, err = st.eval.Add(ctx, st.sum, sum); err != nil {
			return false, 0, he.ConnectError(err)
		}
		if newProd, err = st.eval.Add(ctx, st.products, prod); err != nil {
			return false, 0, he.ConnectError(err)
		}
		if hist != nil {
			if newHist, err = st.eval.Add(ctx, st.histogram, hist); err != nil {
				return false, 0, he.ConnectError(err)
			}
		}
	}
	if persist && st.dir != "" {
		if err := st.saveSubmission(name, owner, req); err != nil {
			return false, 0, err
		}
	}
	st.sum, st.products, st.histogram = newSum, newProd, newHist
	st.count += req.GetCount()
	st.submissions++
	st.seen[name] = true
	return false, st.submissions, nil
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
	st := s.lookup(req.Msg.GetStudyId())
	if st == nil || !st.isAnalyst(who) {
		return nil, denied(who, "read the result of", req.Msg.GetStudyId())
	}
	st.mu.Lock()
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

// saveMeta writes the study's metadata to its directory.
func (st *study) saveMeta() error {
	if err := os.MkdirAll(st.dir, 0o700); err != nil {
		return errorf(connect.CodeInternal, "store unavailable")
	}
	b, err := proto.Marshal(st.meta)
	if err != nil {
		return errorf(connect.CodeInternal, "encoding the study")
	}
	if err := atomicfile.Write(filepath.Join(st.dir, studyFile), b, 0o600); err != nil {
		return errorf(connect.CodeInternal, "store unavailable")
	}
	return nil
}

const (
	studyFile = "study.pb"
	subPrefix = "sub-"
	subSuffix = ".pb"
)

func (st *study) saveSubmission(name, owner string, req *analyticsv1.SubmitRequest) error {
	b, err := proto.Marshal(&analyticsv1.StoredSubmission{Owner: owner, Request: req})
	if err != nil {
		return errorf(connect.CodeInternal, "encoding a submission")
	}
	if err := atomicfile.Write(filepath.Join(st.dir, subPrefix+name+subSuffix), b, 0o600); err != nil {
		return errorf(connect.CodeInternal, "store unavailable")
	}
	return nil
}

// load reads every study and its submissions from the store.
func (s *Service) load() error {
	entries, err := os.ReadDir(s.cfg.dir)
	if err != nil {
		return fmt.Errorf("analytics: store: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(s.cfg.dir, e.Name())
		b, err := os.ReadFile(filepath.Join(dir, studyFile))
		if errors.Is(err, os.ErrNotExist) {
			continue // a study whose creation did not complete
		}
		if err != nil {
			return fmt.Errorf("analytics: store: %w", err)
		}
		m := &analyticsv1.Study{}
		if err := proto.Unmarshal(b, m); err != nil || m.GetStudyId() != e.Name() {
			return fmt.Errorf("analytics: store: study %s is corrupt", e.Name())
		}
		st, err := s.newStudy(m)
		if err != nil {
			return fmt.Errorf("analytics: store: study %s: %w", e.Name(), err)
		}
		subs, err := os.ReadDir(dir)
		if err != nil {
			return fmt.Errorf("analytics: store: %w", err)
		}
		for _, f := range subs {
			name := f.Name()
			if !strings.HasPrefix(name, subPrefix) || !strings.HasSuffix(name, subSuffix) {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil {
				return fmt.Errorf("analytics: store: %w", err)
			}
			rec := &analyticsv1.StoredSubmission{}
			if err := proto.Unmarshal(b, rec); err != nil {
				return fmt.Errorf("analytics: store: submission %s of study %s is corrupt", name, e.Name())
			}
			if _, _, err := st.add(context.Background(), rec.GetOwner(), rec.GetRequest(), false); err != nil {
				return fmt.Errorf("analytics: store: submission %s of study %s: %w", name, e.Name(), err)
			}
		}
		s.studies[m.GetStudyId()] = st
	}
	return nil
}
