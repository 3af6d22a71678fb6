package scoring

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"runtime"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
	scoringv1 "github.com/veilrpc/veil/gen/veil/scoring/v1"
	"github.com/veilrpc/veil/gen/veil/scoring/v1/scoringv1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/pqkex"
)

// Info describes a scoring server's model interface (no weights).
type Info struct {
	Features   int
	Slots      int
	LogitBound float64
	// Output is what the server returns: logits, or masked logits (the decision only).
	Output scoringv1.Output
	// WeightsL1 and BiasAbs bound a logit: |z| <= BiasAbs + WeightsL1 * max_j |x_j|.
	WeightsL1, BiasAbs float64
	// DecisionMaskMax is the largest masking factor (OUTPUT_DECISION).
	DecisionMaskMax float64
	MaxSamples      uint64
	Params          *he.Parameters
}

// Progress reports how far a client operation is.
type Progress struct {
	// Stage is "upload" (Done/Total in bytes of evaluation keys), "encrypt"
	// (ciphertexts sent) or "score" (blocks decrypted).
	Stage       string
	Done, Total int64
}

// Stats describes one Score call.
type Stats struct {
	Samples     int
	Sent        int // samples the server was told of: Samples, or a whole number of blocks with WithPadding
	Blocks      int
	Ciphertexts int // sent (one per feature per block)
	// BytesSent and BytesReceived count the protobuf messages of the scoring call
	// (without the key upload and the HTTP/2 and TLS framing).
	BytesSent, BytesReceived int64
	// KeyBytes is the size of the encoded evaluation-key set; KeyUploaded says whether
	// this call uploaded it (the first call, or after the server lost it).
	KeyBytes    int64
	KeyUploaded bool
	KeyGen      time.Duration // on NewClient, reported by every call
	Upload      time.Duration
	Encrypt     time.Duration
	Decrypt     time.Duration
	Total       time.Duration
	KeyID       string
	ParamID     string
}

// ClientOption configures NewClient.
type ClientOption interface{ applyToClient(*clientConfig) }

type clientOption func(*clientConfig)

func (f clientOption) applyToClient(c *clientConfig) { f(c) }

type clientConfig struct {
	pad      bool
	progress func(Progress)
	opts     []connect.ClientOption
	heClient *he.Client
	busy     int
}

// WithBusyRetries sets how many times a call the server refuses as busy
// (resource_exhausted with a retry hint: admission control) is sent again after the
// hinted delay, within the context's deadline (default 3; 0 returns the refusal).
func WithBusyRetries(n int) ClientOption {
	return clientOption(func(c *clientConfig) { c.busy = max(0, n) })
}

// WithProgress calls f as keys upload, blocks are sent and results arrive; calls
// never overlap.
func WithProgress(f func(Progress)) ClientOption {
	return clientOption(func(c *clientConfig) { c.progress = f })
}

// WithConnectOptions adds Connect client options (rpc.ClientOptions() is always used).
func WithConnectOptions(opts ...connect.ClientOption) ClientOption {
	return clientOption(func(c *clientConfig) { c.opts = append(c.opts, opts...) })
}

// WithPadding pads every batch with zero samples to a whole number of blocks, so that
// the server learns only how many blocks of Slots samples a batch spans, not its exact
// size. The cost is nil: a block costs one ciphertext per feature however full it is.
func WithPadding() ClientOption { return clientOption(func(c *clientConfig) { c.pad = true }) }

// WithHEClient uses an existing secret key (its parameters must be the server's)
// instead of generating one.
func WithHEClient(c *he.Client) ClientOption {
	return clientOption(func(cfg *clientConfig) { cfg.heClient = c })
}

// Client scores batches against a scoring server. It holds the CKKS secret key; the
// server only ever sees ciphertexts and evaluation keys. It is safe for concurrent use.
type Client struct {
	svc      scoringv1connect.ScoringServiceClient
	info     Info
	he       *he.Client
	uploader *keys.Uploader
	pad      bool
	busy     int
	keyID    he.KeyID
	keyBytes int64
	keyGen   time.Duration
	progress func(Progress)

	progressMu sync.Mutex
	uploadMu   sync.Mutex
	mu         sync.Mutex
	uploaded   bool
}

// NewClient asks the server at baseURL for its model interface and key manifest,
// generates a secret key (unless WithHEClient) and exactly the evaluation keys the
// manifest names. Keys are uploaded on the first Score (or by UploadKeys). hc is
// normally rpc.NewHTTPClient; connect options default to rpc's (no compression).
func NewClient(ctx context.Context, hc connect.HTTPClient, baseURL string, opts ...ClientOption) (*Client, error) {
	cfg := clientConfig{busy: 3}
	for _, o := range opts {
		o.applyToClient(&cfg)
	}
	copts := append([]connect.ClientOption{connect.WithAcceptCompression("gzip", nil, nil)}, cfg.opts...)
	svc := scoringv1connect.NewScoringServiceClient(hc, baseURL, copts...)
	keySvc := hev1connect.NewKeyServiceClient(hc, baseURL, copts...)
	res, err := svc.GetModelInfo(ctx, connect.NewRequest(&scoringv1.GetModelInfoRequest{}))
	if err != nil {
		return nil, err
	}
	params, err := ParametersFromProto(res.Msg.GetParameters())
	if err != nil {
		return nil, err
	}
	if int(res.Msg.GetSlots()) != params.Slots() || res.Msg.GetFeatures() == 0 {
		return nil, fmt.Errorf("scoring: server announces %d slots and %d features for %s", res.Msg.GetSlots(), res.Msg.GetFeatures(), params)
	}
	info := Info{
		Features:        int(res.Msg.GetFeatures()),
		Slots:           params.Slots(),
		LogitBound:      res.Msg.GetLogitBound(),
		Output:          res.Msg.GetOutput(),
		WeightsL1:       res.Msg.GetWeightsL1(),
		BiasAbs:         res.Msg.GetBiasAbs(),
		DecisionMaskMax: res.Msg.GetDecisionMaskMax(),
		MaxSamples:      res.Msg.GetMaxSamples(),
		Params:          params,
	}
	switch {
	case info.Output != scoringv1.Output_OUTPUT_LOGIT && info.Output != scoringv1.Output_OUTPUT_DECISION:
		return nil, fmt.Errorf("scoring: the server returns %v; this client needs logits (an older server approximating the sigmoid is not supported)", info.Output)
	case !finiteNonNeg(info.WeightsL1) || !finiteNonNeg(info.BiasAbs):
		return nil, errors.New("scoring: the server announces no bound on its logits")
	case info.Output == scoringv1.Output_OUTPUT_DECISION && !(info.DecisionMaskMax >= 1 && finite(info.DecisionMaskMax)):
		return nil, errors.New("scoring: the server announces no masking bound")
	}
	if info.MaxSamples == 0 {
		info.MaxSamples = DefaultMaxSamples
	}
	c := &Client{
		svc:      svc,
		info:     info,
		he:       cfg.heClient,
		pad:      cfg.pad,
		busy:     cfg.busy,
		progress: cfg.progress,
	}
	if c.he == nil {
		if c.he, err = he.NewClient(params); err != nil {
			return nil, err
		}
	} else if c.he.Params().ID() != params.ID() {
		return nil, fmt.Errorf("scoring: the given key has parameters %s, the server %s", c.he.Params().ID(), params.ID())
	}
	manifest, err := keys.FetchManifest(ctx, keySvc, params, ScoreStreamProcedure)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	evk, err := c.he.GenEvaluationKeys(manifest)
	if err != nil {
		return nil, err
	}
	c.keyGen = time.Since(start)
	c.keyBytes = he.EncodedSize(manifest)
	if c.keyID, err = evk.ID(); err != nil {
		return nil, err
	}
	c.uploader = keys.NewUploader(keySvc, evk, keys.WithProgress(func(sent, total int64) {
		c.report("upload", sent, total)
	}))
	return c, nil
}

// report calls the progress callback, one call at a time: the sender and the
// receiver of a stream report concurrently.
func (c *Client) report(stage string, done, total int64) {
	if c.progress != nil {
		c.progressMu.Lock()
		defer c.progressMu.Unlock()
		c.progress(Progress{Stage: stage, Done: done, Total: total})
	}
}

// Info returns the server's model interface.
func (c *Client) Info() Info { return c.info }

// KeyID returns the ID of the client's evaluation keys.
func (c *Client) KeyID() he.KeyID { return c.keyID }

// UploadKeys makes sure the server holds the client's evaluation keys, and returns
// how long that took (a status call when it already does).
func (c *Client) UploadKeys(ctx context.Context) (time.Duration, error) {
	// One upload at a time: a second stream for the same keys would supersede the first.
	c.uploadMu.Lock()
	defer c.uploadMu.Unlock()
	start := time.Now()
	if _, err := c.uploader.Upload(ctx); err != nil {
		return 0, err
	}
	c.mu.Lock()
	c.uploaded = true
	c.mu.Unlock()
	return time.Since(start), nil
}

// Score encrypts the samples x (each with Info().Features raw feature values),
// streams them to the server block by block, decrypts the logits and returns the
// probabilities sigmoid(z), in the order of x; from a decision-only server
// (OUTPUT_DECISION), 1 or 0 for the class. A decrypted value that x's own features
// make impossible (|z| above Info's bound) fails the call: the server (or the
// ciphertexts) misbehaved. It uploads the evaluation keys first if this client has not
// yet, and again if the server reports them missing. A batch above the server's
// MaxSamples is refused: split it.
func (c *Client) Score(ctx context.Context, x [][]float64) ([]float64, Stats, error) {
	start := time.Now()
	st := Stats{Samples: len(x), KeyBytes: c.keyBytes, KeyGen: c.keyGen, KeyID: string(c.keyID), ParamID: string(c.info.Params.ID())}
	if len(x) == 0 {
		return nil, st, errors.New("scoring: empty batch")
	}
	if err := c.checkRows(x); err != nil {
		return nil, st, err
	}
	if uint64(len(x)) > c.info.MaxSamples {
		return nil, st, fmt.Errorf("scoring: %d samples exceed the server's %d per call: split the batch", len(x), c.info.MaxSamples)
	}
	c.mu.Lock()
	uploaded := c.uploaded
	c.mu.Unlock()
	if !uploaded {
		d, err := c.UploadKeys(ctx)
		if err != nil {
			return nil, st, err
		}
		st.Upload, st.KeyUploaded = d, true
	}
	sent := x
	if c.pad {
		if rem := len(x) % c.info.Slots; rem != 0 {
			zero := make([]float64, c.info.Features)
			sent = append(x[:len(x):len(x)], make([][]float64, c.info.Slots-rem)...)
			for i := len(x); i < len(sent); i++ {
				sent[i] = zero
			}
		}
	}
	st.Sent = len(sent)
	var probs []float64
	attempts := 0
	err := c.uploader.Do(ctx, func(ctx context.Context, id he.KeyID) error {
		// Do calls again only after re-uploading keys the server reported missing.
		if attempts++; attempts > 1 {
			st.KeyUploaded = true
		}
		return c.whenNotBusy(ctx, func() error {
			var err error
			probs, err = c.stream(ctx, sent, &st)
			if pqkex.IsSessionRefused(err) {
				// The replica did not accept the sealed session (its ticket key rotated
				// out, or another replica's): the stream is sent again on a new session.
				probs, err = c.stream(ctx, sent, &st)
			}
			return err
		})
	})
	st.Total = time.Since(start)
	if err != nil {
		return nil, st, err
	}
	return probs[:len(x)], st, nil
}

// stream runs one ScoreStream call: a goroutine encrypts and sends block after block
// while this one receives and decrypts, so encryption, evaluation and decryption overlap.
func (c *Client) stream(ctx context.Context, x [][]float64, st *Stats) ([]float64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	slots := c.info.Slots
	features := c.info.Features
	blocks := (len(x) + slots - 1) / slots
	st.Blocks, st.Ciphertexts = blocks, blocks*features
	st.BytesSent, st.BytesReceived, st.Encrypt, st.Decrypt = 0, 0, 0, 0
	s := c.svc.ScoreStream(ctx)
	type sendResult struct {
		bytes   int64
		encrypt time.Duration
		err     error
	}
	sent := make(chan sendResult, 1)
	go func() {
		var r sendResult
		defer func() { sent <- r }()
		hdr := &scoringv1.ScoreStreamRequest{Part: &scoringv1.ScoreStreamRequest_Header{Header: &scoringv1.ScoreStreamHeader{KeyId: string(c.keyID), Samples: uint64(len(x))}}}
		r.bytes += int64(proto.Size(hdr))
		if r.err = s.Send(hdr); r.err != nil {
			return
		}
		for b := range blocks {
			t := time.Now()
			vs, err := c.encryptColumns(x[b*slots : min(len(x), (b+1)*slots)])
			r.encrypt += time.Since(t)
			if err != nil {
				r.err = err
				return
			}
			for j, v := range vs {
				msg := &scoringv1.ScoreStreamRequest{Part: &scoringv1.ScoreStreamRequest_Block{Block: &scoringv1.FeatureBlock{Block: uint32(b), Feature: uint32(j), Values: v}}}
				r.bytes += int64(proto.Size(msg))
				if r.err = s.Send(msg); r.err != nil {
					return
				}
				c.report("encrypt", int64(b*features+j+1), int64(blocks*features))
			}
		}
		r.err = s.CloseRequest()
	}()
	probs := make([]float64, 0, len(x))
	var recvErr error
	for b := range blocks {
		res, err := s.Receive()
		if err != nil {
			recvErr = err
			break
		}
		if int(res.GetBlock()) != b {
			recvErr = fmt.Errorf("scoring: server answered block %d, want %d", res.GetBlock(), b)
			break
		}
		st.BytesReceived += int64(proto.Size(res))
		t := time.Now()
		v, err := he.UnmarshalVector(c.info.Params, res.GetLogits())
		if err == nil && v.Len() != min(slots, len(x)-b*slots) {
			err = fmt.Errorf("scoring: block %d holds %d results, want %d", b, v.Len(), min(slots, len(x)-b*slots))
		}
		var p []float64
		if err == nil {
			p, err = c.results(v, x[b*slots:min(len(x), (b+1)*slots)])
		}
		st.Decrypt += time.Since(t)
		if err != nil {
			recvErr = err
			break
		}
		probs = append(probs, p...)
		c.report("score", int64(b+1), int64(blocks))
	}
	if recvErr != nil {
		cancel()
	}
	r := <-sent
	st.BytesSent, st.Encrypt = r.bytes, r.encrypt
	_ = s.CloseResponse()
	if recvErr != nil {
		if errors.Is(recvErr, io.EOF) {
			recvErr = errors.New("scoring: the server closed the stream early")
		}
		return nil, recvErr
	}
	if r.err != nil {
		return nil, r.err
	}
	return probs, nil
}

// ScoreBlock scores at most Info().Slots samples with one unary Score call (one
// message carrying every feature's ciphertext). Score streams any batch size; this is
// the simpler call for small batches and for clients without bidirectional streams.
func (c *Client) ScoreBlock(ctx context.Context, x [][]float64) ([]float64, error) {
	if len(x) == 0 || len(x) > c.info.Slots {
		return nil, fmt.Errorf("scoring: ScoreBlock takes 1 to %d samples, have %d", c.info.Slots, len(x))
	}
	if _, err := c.UploadKeys(ctx); err != nil {
		return nil, err
	}
	if err := c.checkRows(x); err != nil {
		return nil, err
	}
	vs, err := c.encryptColumns(x)
	if err != nil {
		return nil, err
	}
	req := &scoringv1.ScoreRequest{KeyId: string(c.keyID), Features: vs}
	var res *connect.Response[scoringv1.ScoreResponse]
	err = c.whenNotBusy(ctx, func() (err error) {
		res, err = c.svc.Score(ctx, connect.NewRequest(req))
		return err
	})
	if err != nil {
		return nil, err
	}
	v, err := he.UnmarshalVector(c.info.Params, res.Msg.GetLogits())
	if err != nil {
		return nil, err
	}
	if v.Len() != len(x) {
		return nil, fmt.Errorf("scoring: server returned %d results for %d samples", v.Len(), len(x))
	}
	return c.results(v, x)
}

// whenNotBusy runs call, and again after the hinted delay while the server refuses it
// as busy (resource_exhausted with a retry hint), at most c.busy more times.
func (c *Client) whenNotBusy(ctx context.Context, call func() error) error {
	for attempt := 0; ; attempt++ {
		err := call()
		d, busy := keys.RetryAfter(err)
		if !busy || connect.CodeOf(err) != connect.CodeResourceExhausted || attempt >= c.busy {
			return err
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// logitSlack is the CKKS error allowed on a decrypted logit, per unit of the bound
// (relative) and absolute; measured errors are below 1e-6 (docs/services.md).
const logitSlack = 1e-4

// results decrypts the logits (or masked logits) of rows, checks each against the
// bound its own features give, and returns probabilities (or 0/1 decisions).
func (c *Client) results(v *he.Vector, rows [][]float64) ([]float64, error) {
	z, err := c.he.Decrypt(v)
	if err != nil {
		return nil, err
	}
	scale := 1.0
	if c.info.Output == scoringv1.Output_OUTPUT_DECISION {
		scale = c.info.DecisionMaskMax
	}
	out := make([]float64, len(rows))
	for i, row := range rows {
		var xmax float64
		for _, x := range row {
			xmax = max(xmax, math.Abs(x))
		}
		bound := scale * (c.info.BiasAbs + c.info.WeightsL1*xmax) * (1 + logitSlack)
		if !finite(z[i]) || math.Abs(z[i]) > bound+scale*logitSlack {
			return nil, fmt.Errorf("scoring: the server answered %g for a sample whose logit is at most %g in magnitude: refusing the results", z[i], bound)
		}
		switch {
		case c.info.Output != scoringv1.Output_OUTPUT_DECISION:
			out[i] = sigmoid(z[i])
		case z[i] >= 0:
			out[i] = 1
		default:
			out[i] = 0
		}
	}
	return out, nil
}

func finiteNonNeg(x float64) bool { return finite(x) && x >= 0 }

// encryptColumns encrypts each feature of rows (at most Slots samples) into one
// vector, features in parallel on GOMAXPROCS goroutines.
func (c *Client) encryptColumns(rows [][]float64) ([]*hev1.EncryptedVector, error) {
	out := make([]*hev1.EncryptedVector, c.info.Features)
	errs := make([]error, c.info.Features)
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	var wg sync.WaitGroup
	for j := range c.info.Features {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			col := make([]float64, len(rows))
			for i, row := range rows {
				col[i] = row[j]
			}
			v, err := c.he.Encrypt(col)
			if err == nil {
				out[j], err = he.MarshalVector(v)
			}
			errs[j] = err
		}()
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

func (c *Client) checkRows(x [][]float64) error {
	for i, row := range x {
		if len(row) != c.info.Features {
			return fmt.Errorf("scoring: sample %d has %d features, the model %d", i, len(row), c.info.Features)
		}
	}
	return nil
}
