// Package scoring is encrypted logistic-regression inference (veil.scoring.v1).
//
// The server holds a plaintext Model; a client encrypts a batch of feature vectors
// with CKKS, one vector per feature with the samples across its slots, and uploads a
// relinearization key once. For every block of Slots samples the server computes
//
//	z = sum_j w_j * x_j + b          (one level: LinearCombination)
//
// where w, b are the model's weights with the feature standardization folded in, and
// returns the encrypted logits, which only the client can decrypt; the client applies
// the sigmoid, exactly. With WithDecisionOnly the server returns each logit times a
// fresh secret random factor instead, so that the client learns the class and little
// more. See docs/services.md for the design and the error bound.
package scoring

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"time"

	"connectrpc.com/connect"

	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	scoringv1 "github.com/veilrpc/veil/gen/veil/scoring/v1"
	"github.com/veilrpc/veil/gen/veil/scoring/v1/scoringv1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/rpc"
)

// Procedure names, for policies and read limits.
const (
	GetModelInfoProcedure = scoringv1connect.ScoringServiceGetModelInfoProcedure
	ScoreProcedure        = scoringv1connect.ScoringServiceScoreProcedure
	ScoreStreamProcedure  = scoringv1connect.ScoringServiceScoreStreamProcedure
)

// Option configures New. Options are values with an unexported method, as in connect-go and package rpc.
type Option interface{ applyToService(*config) }

type option func(*config)

func (f option) applyToService(c *config) { f(c) }

type config struct {
	params     *he.Parameters
	regOpts    []keys.RegistryOption
	admOpts    []keys.AdmissionOption
	maxSamples uint64
	decision   bool
	quota      uint64
	window     time.Duration
	now        func() time.Time
}

// DefaultMaxSamples bounds the samples of one ScoreStream call unless WithMaxSamples
// says otherwise: 2^20, 128 blocks on ParamsN14.
const DefaultMaxSamples = 1 << 20

// WithMaxSamples bounds the samples one ScoreStream call may declare (default
// DefaultMaxSamples); a header above it is resource_exhausted. An admitted stream
// holds its admission until it ends, so this bounds how long one call can hold it.
func WithMaxSamples(n uint64) Option { return option(func(c *config) { c.maxSamples = n }) }

// WithAdmissionOptions configures admission control (keys.NewAdmission): the memory and the
// calls Score and ScoreStream may hold at once, in all and per identity. Every call
// is charged, before its body is read, the most it can hold (CallCost).
func WithAdmissionOptions(opts ...keys.AdmissionOption) Option {
	return option(func(c *config) { c.admOpts = append(c.admOpts, opts...) })
}

// WithParameters sets the CKKS parameters (default he.ParamsN13). They need one level
// for the logits, two with WithDecisionOnly.
func WithParameters(p *he.Parameters) Option { return option(func(c *config) { c.params = p }) }

// DecisionMaskMax is the largest masking factor WithDecisionOnly multiplies a logit by.
const DecisionMaskMax = 1 << 16

// WithDecisionOnly makes the service return only the decision: each encrypted logit
// times a fresh random factor in [1, DecisionMaskMax] the server draws and forgets
// (one more level). The client learns each sample's class (the sign) and that |z| lies
// within a factor DecisionMaskMax of what it decrypts, not the probability, so
// extracting the model takes many more, adaptively chosen, queries (docs/services.md).
func WithDecisionOnly() Option { return option(func(c *config) { c.decision = true }) }

// WithSampleQuota bounds the samples one identity may have scored per window (Score
// and ScoreStream together, counted when a call declares them); a call over it is
// resource_exhausted with a retry hint. It slows model extraction by one identity; it
// cannot stop several identities pooling their answers.
func WithSampleQuota(samples uint64, window time.Duration) Option {
	return option(func(c *config) { c.quota, c.window = samples, window })
}

// WithClock replaces time.Now for the sample quota's windows (tests).
func WithClock(now func() time.Time) Option { return option(func(c *config) { c.now = now }) }

// WithRegistryOptions configures the evaluation-key registry (memory budget, TTL,
// on-disk store).
func WithRegistryOptions(opts ...keys.RegistryOption) Option {
	return option(func(c *config) { c.regOpts = append(c.regOpts, opts...) })
}

// Service implements scoringv1connect.ScoringServiceHandler over a plaintext model.
type Service struct {
	model    *Model
	params   *he.Parameters
	weights  []float64 // folded: on raw features
	bias     float64
	reg      *keys.Registry
	manifest *he.Manifest
	adm      *keys.Admission
	cfg      config
	quota    *sampleQuota
}

var _ scoringv1connect.ScoringServiceHandler = (*Service)(nil)

// New returns a scoring service for model.
func New(model *Model, opts ...Option) (*Service, error) {
	if err := model.Validate(); err != nil {
		return nil, err
	}
	cfg := config{params: he.ParamsN13(), maxSamples: DefaultMaxSamples, now: time.Now}
	for _, o := range opts {
		o.applyToService(&cfg)
	}
	if cfg.params == nil {
		return nil, errors.New("scoring: nil parameters")
	}
	if need := 1 + boolInt(cfg.decision); cfg.params.MaxLevel() < need {
		return nil, fmt.Errorf("scoring: the parameters have %d levels, the circuit needs %d", cfg.params.MaxLevel(), need)
	}
	if cfg.quota > 0 && cfg.window <= 0 {
		return nil, errors.New("scoring: a sample quota needs a positive window")
	}
	reg, err := keys.NewRegistry(cfg.params, cfg.regOpts...)
	if err != nil {
		return nil, fmt.Errorf("scoring: %w", err)
	}
	w, b := model.Folded()
	adm, err := keys.NewAdmission(PeerIdentity, cfg.admOpts...)
	if err != nil {
		return nil, fmt.Errorf("scoring: %w", err)
	}
	if cfg.maxSamples < 1 {
		return nil, errors.New("scoring: the sample bound must be positive")
	}
	return &Service{
		adm:      adm,
		cfg:      cfg,
		model:    model,
		params:   cfg.params,
		weights:  w,
		bias:     b,
		reg:      reg,
		manifest: he.NewManifest(cfg.params, he.NeedRelinearization()),
		quota:    newSampleQuota(cfg.quota, cfg.window, cfg.now),
	}, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Params returns the service's CKKS parameters.
func (s *Service) Params() *he.Parameters { return s.params }

// Output returns what the service's encrypted results are.
func (s *Service) Output() scoringv1.Output {
	if s.cfg.decision {
		return scoringv1.Output_OUTPUT_DECISION
	}
	return scoringv1.Output_OUTPUT_LOGIT
}

// Registry returns the evaluation-key registry the service evaluates with.
func (s *Service) Registry() *keys.Registry { return s.reg }

// Manifests returns the key manifest of each scoring procedure, for the KeyService.
func (s *Service) Manifests() map[string]*he.Manifest {
	return map[string]*he.Manifest{ScoreProcedure: s.manifest, ScoreStreamProcedure: s.manifest}
}

// KeyServiceHandler serves veil.he.v1.KeyService for this service's registry, with
// uploads owned by the caller's SPIFFE ID. Mount it with rpc.Server.Handle.
func (s *Service) KeyServiceHandler(opts ...connect.HandlerOption) (string, http.Handler) {
	return keys.NewKeyServiceHandler(s.reg, PeerIdentity, s.Manifests(), opts...)
}

// Register mounts the scoring service, behind admission control, and its KeyService
// on srv. The server's options should include ServerOptions (read limits) and a
// policy allowing the callers on "/veil.scoring.v1.ScoringService/*" and
// "/veil.he.v1.KeyService/*".
func (s *Service) Register(srv *rpc.Server) {
	srv.Handle(func(opts ...connect.HandlerOption) (string, http.Handler) {
		path, h := scoringv1connect.NewScoringServiceHandler(s, opts...)
		return path, s.adm.Handler(s.requestCost, h)
	})
	srv.Handle(s.KeyServiceHandler)
}

// Admission returns the service's admission controller (its Stats say how much memory
// the admitted calls hold, and held at most).
func (s *Service) Admission() *keys.Admission { return s.adm }

// CallCost returns the bytes one Score call (stream false) or ScoreStream call holds
// at most, with a request body of body bytes (Score only; at most its read limit):
// the body, its decoded message (as large: protobuf copies bytes fields), one
// decoded ciphertext per feature, and the evaluation's intermediate ciphertexts.
// Admission charges it before the body is read; the evaluation buffers are the
// registry's WorkerPool, apart.
func (s *Service) CallCost(stream bool, body int64) int64 {
	limits := ReadLimits(s.params, s.model.Features)
	if stream {
		body = limits[ScoreStreamProcedure]
	} else if body <= 0 || body > limits[ScoreProcedure] {
		body = limits[ScoreProcedure]
	}
	ct := he.CiphertextMemory(s.params)
	return 2*body + int64(s.model.Features)*ct + int64(s.evalCiphertexts())*ct
}

// evalCiphertexts bounds the ciphertexts one block's evaluation holds besides its
// inputs: the linear layer's accumulator and a lowered operand, the masked result and
// its encoded mask, the marshalled result.
func (s *Service) evalCiphertexts() int { return 6 }

func (s *Service) requestCost(r *http.Request) int64 {
	switch r.URL.Path {
	case ScoreProcedure:
		return s.CallCost(false, r.ContentLength)
	case ScoreStreamProcedure:
		return s.CallCost(true, 0)
	}
	return 0
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
	var l1 float64
	for _, w := range s.weights {
		l1 += math.Abs(w)
	}
	res := &scoringv1.GetModelInfoResponse{
		Parameters:  ParametersProto(s.params),
		Features:    uint32(s.model.Features),
		Slots:       uint32(s.params.Slots()),
		LogitBound:  s.model.LogitBound,
		Procedures:  []string{ScoreProcedure, ScoreStreamProcedure},
		Output:      s.Output(),
		WeightsL1:   l1,
		BiasAbs:     math.Abs(s.bias),
		MaxSamples:  s.cfg.maxSamples,
		SampleQuota: s.cfg.quota,
	}
	if s.cfg.decision {
		res.DecisionMaskMax = DecisionMaskMax
	}
	if s.cfg.quota > 0 {
		res.QuotaWindowSeconds = uint64(s.cfg.window / time.Second)
	}
	return connect.NewResponse(res), nil
}

func invalid(format string, args ...any) error {
	return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("scoring: "+format, args...))
}

// chargeSamples counts n samples against the caller's quota.
func (s *Service) chargeSamples(ctx context.Context, n uint64) error {
	if s.quota == nil {
		return nil
	}
	owner, err := PeerIdentity(ctx)
	if err != nil {
		return err
	}
	return s.quota.charge(owner, n)
}

// evaluator returns the caller's evaluator over key set id.
func (s *Service) evaluator(ctx context.Context, id string) (*he.Evaluator, error) {
	owner, err := PeerIdentity(ctx)
	if err != nil {
		return nil, err
	}
	ev, err := s.reg.Evaluator(owner, he.KeyID(id))
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	return ev, nil
}

// scoreBlock computes the encrypted logits (or masked logits) of one block.
func (s *Service) scoreBlock(ctx context.Context, ev *he.Evaluator, features []*he.Vector) (*hev1.EncryptedVector, error) {
	z, err := ev.LinearCombination(ctx, features, s.weights, s.bias)
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	if s.cfg.decision {
		mask, err := decisionMask(z.Len())
		if err != nil {
			return nil, connect.NewError(connect.CodeInternal, errors.New("scoring: no randomness"))
		}
		if z, err = ev.MulPlain(ctx, z, mask); err != nil {
			return nil, keys.ConnectError(err)
		}
	}
	out, err := he.MarshalVector(z)
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	return out, nil
}

// decodeFeature validates one feature vector of a block of n samples.
func (s *Service) decodeFeature(m *hev1.EncryptedVector, feature, n int) (*he.Vector, error) {
	v, err := he.UnmarshalVector(s.params, m)
	if err != nil {
		return nil, keys.ConnectError(err)
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
	n := msgs[0].GetLength()
	if err := s.chargeSamples(ctx, n); err != nil {
		return nil, err
	}
	ev, err := s.evaluator(ctx, req.Msg.GetKeyId())
	if err != nil {
		return nil, err
	}
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
	return connect.NewResponse(&scoringv1.ScoreResponse{Logits: out}), nil
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
	slots := uint64(s.params.Slots())
	samples := h.GetSamples()
	if samples > s.cfg.maxSamples {
		return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("scoring: %d samples exceed this server's %d per stream: split the batch", samples, s.cfg.maxSamples))
	}
	if err := s.chargeSamples(ctx, samples); err != nil {
		return err
	}
	ev, err := s.evaluator(ctx, h.GetKeyId())
	if err != nil {
		return err
	}
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
		if err := stream.Send(&scoringv1.ScoreStreamResponse{Block: uint32(b), Logits: out}); err != nil {
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
