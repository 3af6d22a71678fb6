// Package scoring is encrypted logistic-regression inference (veil.scoring.v1).
//
// The server holds a plaintext Model; a client encrypts a batch of feature vectors
// with CKKS, one vector per feature with the samples across its slots, and uploads a
// relinearization key once. For every block of Slots samples the server computes
//
//	t = sum_j (w_j / B) * x_j + b / B          (one level: LinearCombination)
//	p = q(t), q ~ sigmoid(B * t) on [-1, 1]    (Chebyshev, ceil(log2(degree+1)) levels)
//
// where w, b are the model's weights with the feature standardization folded in and
// B is the model's LogitBound, and returns the encrypted probabilities, which only
// the client can decrypt. See docs/services.md for the parameter choice and the
// measured error bound.
package scoring

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"

	"connectrpc.com/connect"

	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	scoringv1 "github.com/veilrpc/veil/gen/veil/scoring/v1"
	"github.com/veilrpc/veil/gen/veil/scoring/v1/scoringv1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/rpc"
)

// Procedure names, for policies and read limits.
const (
	GetModelInfoProcedure = scoringv1connect.ScoringServiceGetModelInfoProcedure
	ScoreProcedure        = scoringv1connect.ScoringServiceScoreProcedure
	ScoreStreamProcedure  = scoringv1connect.ScoringServiceScoreStreamProcedure
)

// MaxDegree bounds the default degree of the sigmoid approximation: beyond it the
// approximation error on the intervals Train produces is far below the CKKS noise
// and each doubling of the degree costs another level and twice the multiplications.
const MaxDegree = 63

// Option configures New.
type Option func(*config)

type config struct {
	params  *he.Parameters
	degree  int
	regOpts []he.RegistryOption
}

// WithParameters sets the CKKS parameters (default he.ParamsN14). They need at least
// 3 levels: one for the linear layer and two for a degree-3 sigmoid.
func WithParameters(p *he.Parameters) Option { return func(c *config) { c.params = p } }

// WithDegree sets the degree of the sigmoid approximation (default: the largest
// 2^k - 1, at most MaxDegree, that fits the parameters' levels).
func WithDegree(d int) Option { return func(c *config) { c.degree = d } }

// WithRegistryOptions configures the evaluation-key registry (memory budget, TTL,
// on-disk store).
func WithRegistryOptions(opts ...he.RegistryOption) Option {
	return func(c *config) { c.regOpts = append(c.regOpts, opts...) }
}

// Service implements scoringv1connect.ScoringServiceHandler over a plaintext model.
type Service struct {
	model     *Model
	params    *he.Parameters
	weights   []float64 // folded weights divided by the logit bound
	bias      float64
	poly      *he.Polynomial
	approxErr float64
	reg       *he.Registry
	manifest  *he.Manifest
}

var _ scoringv1connect.ScoringServiceHandler = (*Service)(nil)

// New returns a scoring service for model.
func New(model *Model, opts ...Option) (*Service, error) {
	if err := model.Validate(); err != nil {
		return nil, err
	}
	cfg := config{params: he.ParamsN14()}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.params == nil {
		return nil, errors.New("scoring: nil parameters")
	}
	levels := cfg.params.MaxLevel()
	if cfg.degree == 0 {
		cfg.degree = min(1<<(levels-1)-1, MaxDegree)
	}
	if cfg.degree < 3 {
		return nil, fmt.Errorf("scoring: parameters with %d levels leave no room for a sigmoid of degree 3 or more after the linear layer", levels)
	}
	B := model.LogitBound
	poly, err := he.ChebyshevApproximation(func(t float64) float64 { return he.Sigmoid(B * t) }, -1, 1, cfg.degree)
	if err != nil {
		return nil, fmt.Errorf("scoring: %w", err)
	}
	if need := 1 + poly.Depth(); need > levels {
		return nil, fmt.Errorf("scoring: a degree-%d sigmoid needs %d levels with the linear layer, the parameters have %d", cfg.degree, need, levels)
	}
	reg, err := he.NewRegistry(cfg.params, cfg.regOpts...)
	if err != nil {
		return nil, fmt.Errorf("scoring: %w", err)
	}
	w, b := model.Folded()
	for j := range w {
		w[j] /= B
	}
	return &Service{
		model:     model,
		params:    cfg.params,
		weights:   w,
		bias:      b / B,
		poly:      poly,
		approxErr: approximationError(poly, B),
		reg:       reg,
		manifest:  he.NewManifest(cfg.params, he.NeedRelinearization()),
	}, nil
}

// approximationError returns max |q(t) - sigmoid(B t)| over 1001 points of [-1, 1]
// (the Chebyshev error oscillates smoothly, so the grid finds its peaks).
func approximationError(p *he.Polynomial, B float64) float64 {
	var worst float64
	const n = 1000
	for i := range n + 1 {
		t := -1 + 2*float64(i)/n
		worst = max(worst, math.Abs(p.Evaluate(t)-he.Sigmoid(B*t)))
	}
	return worst
}

// Params returns the service's CKKS parameters.
func (s *Service) Params() *he.Parameters { return s.params }

// Degree returns the degree of the sigmoid approximation.
func (s *Service) Degree() int { return s.poly.Degree() }

// ApproximationError returns the largest |approximation - sigmoid| on the interval.
func (s *Service) ApproximationError() float64 { return s.approxErr }

// Approximate returns, in the clear, the probability the encrypted circuit computes
// for raw features x, less the CKKS noise: the approximation q(logit / B).
func (s *Service) Approximate(x []float64) float64 {
	return s.poly.Evaluate(s.model.Logit(x) / s.model.LogitBound)
}

// Registry returns the evaluation-key registry the service evaluates with.
func (s *Service) Registry() *he.Registry { return s.reg }

// Manifests returns the key manifest of each scoring procedure, for the KeyService.
func (s *Service) Manifests() map[string]*he.Manifest {
	return map[string]*he.Manifest{ScoreProcedure: s.manifest, ScoreStreamProcedure: s.manifest}
}

// KeyServiceHandler serves veil.he.v1.KeyService for this service's registry, with
// uploads owned by the caller's SPIFFE ID. Mount it with rpc.Server.Handle.
func (s *Service) KeyServiceHandler(opts ...connect.HandlerOption) (string, http.Handler) {
	return he.NewKeyServiceHandler(s.reg, PeerIdentity, s.Manifests(), opts...)
}

// Register mounts the scoring service and its KeyService on srv. The server's options
// should include ServerOptions (read limits) and a policy allowing the callers on
// "/veil.scoring.v1.ScoringService/*" and "/veil.he.v1.KeyService/*".
func (s *Service) Register(srv *rpc.Server) {
	rpc.Register[scoringv1connect.ScoringServiceHandler](srv, scoringv1connect.NewScoringServiceHandler, s)
	srv.Handle(s.KeyServiceHandler)
}

// ReadLimits returns the per-procedure read limits the service needs with params and
// a model of the given feature count: Score carries one ciphertext per feature,
// ScoreStream one per message. The KeyService's upload chunks (1 MiB) fit the default.
func ReadLimits(params *he.Parameters, features int) map[string]int64 {
	one := he.MaxVectorWireSize(params, params.Slots()) + 1024
	return map[string]int64{
		ScoreProcedure:       int64(features)*one + 4096,
		ScoreStreamProcedure: one,
	}
}

// ServerOptions returns rpc.WithReadLimit for each procedure of ReadLimits whose limit
// exceeds rpc.DefaultReadLimit.
func (s *Service) ServerOptions() []rpc.ServerOption {
	var out []rpc.ServerOption
	for p, n := range ReadLimits(s.params, s.model.Features) {
		if n > rpc.DefaultReadLimit {
			out = append(out, rpc.WithReadLimit(p, n))
		}
	}
	return out
}

// PeerIdentity returns the caller's SPIFFE ID: the owner of the keys it uploads.
func PeerIdentity(ctx context.Context) (string, error) {
	p, ok := rpc.PeerFromContext(ctx)
	if !ok || p.ID.IsZero() {
		return "", connect.NewError(connect.CodeUnauthenticated, errors.New("scoring: no verified caller"))
	}
	return p.ID.String(), nil
}

// ParametersProto describes params for GetModelInfo.
func ParametersProto(params *he.Parameters) *scoringv1.Parameters {
	lit := params.Literal()
	out := &scoringv1.Parameters{LogN: uint32(lit.LogN), LogDefaultScale: uint32(lit.LogDefaultScale), ParamId: string(params.ID())}
	for _, q := range lit.LogQ {
		out.LogQ = append(out.LogQ, uint32(q))
	}
	for _, p := range lit.LogP {
		out.LogP = append(out.LogP, uint32(p))
	}
	return out
}

// ParametersFromProto rebuilds a parameter set (refusing sets above the 128-bit
// bound) and checks that its ID is the one announced.
func ParametersFromProto(m *scoringv1.Parameters) (*he.Parameters, error) {
	if m == nil {
		return nil, errors.New("scoring: no parameters")
	}
	lit := he.Literal{LogN: int(m.GetLogN()), LogDefaultScale: int(m.GetLogDefaultScale())}
	for _, q := range m.GetLogQ() {
		lit.LogQ = append(lit.LogQ, int(q))
	}
	for _, p := range m.GetLogP() {
		lit.LogP = append(lit.LogP, int(p))
	}
	params, err := he.NewParameters(lit)
	if err != nil {
		return nil, fmt.Errorf("scoring: server parameters: %w", err)
	}
	if string(params.ID()) != m.GetParamId() {
		return nil, fmt.Errorf("scoring: server parameters have ID %s, announced %s", params.ID(), m.GetParamId())
	}
	return params, nil
}

// GetModelInfo describes the model's encrypted interface.
func (s *Service) GetModelInfo(context.Context, *connect.Request[scoringv1.GetModelInfoRequest]) (*connect.Response[scoringv1.GetModelInfoResponse], error) {
	return connect.NewResponse(&scoringv1.GetModelInfoResponse{
		Parameters:         ParametersProto(s.params),
		Features:           uint32(s.model.Features),
		Slots:              uint32(s.params.Slots()),
		LogitBound:         s.model.LogitBound,
		Degree:             uint32(s.poly.Degree()),
		ApproximationError: s.approxErr,
		Procedures:         []string{ScoreProcedure, ScoreStreamProcedure},
	}), nil
}

func invalid(format string, args ...any) error {
	return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("scoring: "+format, args...))
}

// evaluator returns the caller's evaluator over key set id.
func (s *Service) evaluator(ctx context.Context, id string) (*he.Evaluator, error) {
	owner, err := PeerIdentity(ctx)
	if err != nil {
		return nil, err
	}
	ev, err := s.reg.Evaluator(owner, he.KeyID(id))
	if err != nil {
		return nil, he.ConnectError(err)
	}
	return ev, nil
}

// scoreBlock computes the encrypted probabilities of one block.
func (s *Service) scoreBlock(ctx context.Context, ev *he.Evaluator, features []*he.Vector) (*hev1.EncryptedVector, error) {
	t, err := ev.LinearCombination(ctx, features, s.weights, s.bias)
	if err != nil {
		return nil, he.ConnectError(err)
	}
	p, err := ev.EvalPolynomial(ctx, t, s.poly)
	if err != nil {
		return nil, he.ConnectError(err)
	}
	out, err := he.MarshalVector(p)
	if err != nil {
		return nil, he.ConnectError(err)
	}
	return out, nil
}

// decodeFeature validates one feature vector of a block of n samples.
func (s *Service) decodeFeature(m *hev1.EncryptedVector, feature, n int) (*he.Vector, error) {
	v, err := he.UnmarshalVector(s.params, m)
	if err != nil {
		return nil, he.ConnectError(err)
	}
	if v.Len() != n {
		return nil, invalid("feature %d holds %d samples, want %d", feature, v.Len(), n)
	}
	return v, nil
}

// Score scores one block of at most Slots samples.
func (s *Service) Score(ctx context.Context, req *connect.Request[scoringv1.ScoreRequest]) (*connect.Response[scoringv1.ScoreResponse], error) {
	msgs := req.Msg.GetFeatures()
	if len(msgs) != s.model.Features {
		return nil, invalid("%d feature vectors, the model has %d features", len(msgs), s.model.Features)
	}
	ev, err := s.evaluator(ctx, req.Msg.GetKeyId())
	if err != nil {
		return nil, err
	}
	n := msgs[0].GetLength()
	if n > uint64(s.params.Slots()) {
		return nil, invalid("a batch of %d samples exceeds the %d slots of one ciphertext: send it with ScoreStream", n, s.params.Slots())
	}
	vs := make([]*he.Vector, len(msgs))
	for j, m := range msgs {
		if vs[j], err = s.decodeFeature(m, j, int(n)); err != nil {
			return nil, err
		}
	}
	out, err := s.scoreBlock(ctx, ev, vs)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&scoringv1.ScoreResponse{Probabilities: out}), nil
}

// ScoreStream scores a batch of any size, block by block.
func (s *Service) ScoreStream(ctx context.Context, stream *connect.BidiStream[scoringv1.ScoreStreamRequest, scoringv1.ScoreStreamResponse]) error {
	first, err := stream.Receive()
	if errors.Is(err, io.EOF) {
		return invalid("empty stream")
	}
	if err != nil {
		return err
	}
	h := first.GetHeader()
	if h == nil {
		return invalid("the first message must be a header")
	}
	ev, err := s.evaluator(ctx, h.GetKeyId())
	if err != nil {
		return err
	}
	slots := uint64(s.params.Slots())
	samples := h.GetSamples()
	blocks := int((samples + slots - 1) / slots)
	features := s.model.Features
	vs := make([]*he.Vector, features)
	for b := range blocks {
		n := int(min(slots, samples-uint64(b)*slots))
		for j := range features {
			msg, err := stream.Receive()
			if errors.Is(err, io.EOF) {
				return invalid("stream ended at block %d feature %d of %d blocks", b, j, blocks)
			}
			if err != nil {
				return err
			}
			fb := msg.GetBlock()
			if fb == nil {
				return invalid("a header after the first message")
			}
			if int(fb.GetBlock()) != b || int(fb.GetFeature()) != j {
				return invalid("got block %d feature %d, want block %d feature %d (blocks in order, features in model order)", fb.GetBlock(), fb.GetFeature(), b, j)
			}
			if vs[j], err = s.decodeFeature(fb.GetValues(), j, n); err != nil {
				return err
			}
		}
		out, err := s.scoreBlock(ctx, ev, vs)
		if err != nil {
			return err
		}
		if err := stream.Send(&scoringv1.ScoreStreamResponse{Block: uint32(b), Probabilities: out}); err != nil {
			return err
		}
	}
	if _, err := stream.Receive(); !errors.Is(err, io.EOF) {
		if err != nil {
			return err
		}
		return invalid("more messages than the header's %d samples need", samples)
	}
	return nil
}
