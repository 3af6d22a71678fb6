package scoring_test

import (
	"context"
	"math"
	"strings"
	"testing"

	"connectrpc.com/connect"

	scoringv1 "github.com/veilrpc/veil/gen/veil/scoring/v1"
	"github.com/veilrpc/veil/gen/veil/scoring/v1/scoringv1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/scoring"
)

// scaled returns a sample whose logit is target: x moved along its own deviation
// from the feature means (the logit is affine in that move).
func scaled(m *scoring.Model, x []float64, target float64) []float64 {
	c := (target - m.Bias) / (m.Logit(x) - m.Bias)
	out := make([]float64, len(x))
	for j := range x {
		out[j] = m.Mean[j] + c*(x[j]-m.Mean[j])
	}
	return out
}

// TestOutOfIntervalSamples: samples whose logits are 1.1 and 1.5 times the training
// interval's half-width, mixed into a block of good ones, corrupt neither the good
// samples' answers nor their own.
func TestOutOfIntervalSamples(t *testing.T) {
	ds, _ := scoring.Synthetic(9, 300, 4)
	m, err := scoring.Train(ds.X[:200], ds.Y[:200], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, m, scoring.WithParameters(smallParams(t)))
	c := e.client(t, alice)
	x := append([][]float64(nil), ds.X[200:]...)
	bad := map[int]bool{}
	for i, f := range []float64{1.1, -1.1, 1.5, -1.5, 1.5, 3} {
		k := 7 + 13*i
		x[k] = scaled(m, x[k], f*m.LogitBound)
		bad[k] = true
	}
	got, _, err := c.Score(context.Background(), x)
	if err != nil {
		t.Fatal(err)
	}
	var worstGood, worstBad float64
	for i, row := range x {
		d := math.Abs(got[i] - m.Predict(row))
		if bad[i] {
			worstBad = max(worstBad, d)
		} else {
			worstGood = max(worstGood, d)
		}
	}
	t.Logf("largest error: good samples %g, out-of-interval samples %g", worstGood, worstBad)
	if worstGood > noiseBound || worstBad > noiseBound {
		t.Errorf("errors %g (good) and %g (out of the interval) above the documented bound %g", worstGood, worstBad, noiseBound)
	}
}

// inflating is a hostile server: it scores honestly, then multiplies the encrypted
// logits by a large integer (no key needed) before answering.
type inflating struct {
	*scoring.Service
	ev *he.Evaluator
}

func (f inflating) Score(ctx context.Context, req *connect.Request[scoringv1.ScoreRequest]) (*connect.Response[scoringv1.ScoreResponse], error) {
	res, err := f.Service.Score(ctx, req)
	if err != nil {
		return nil, err
	}
	v, err := he.UnmarshalVector(f.Params(), res.Msg.GetLogits())
	if err == nil {
		v, err = f.ev.MulScalar(ctx, v, 1_000_000)
	}
	if err == nil {
		res.Msg.Logits, err = he.MarshalVector(v)
	}
	return res, err
}

// TestClientRejectsImpossibleLogits: a server that returns logits its model cannot
// produce for these features is caught by the client, which returns an error, not
// probabilities.
func TestClientRejectsImpossibleLogits(t *testing.T) {
	ds, _ := scoring.Synthetic(10, 104, 3)
	m, err := scoring.Train(ds.X[:100], ds.Y[:100], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := scoring.New(m, scoring.WithParameters(smallParams(t)))
	if err != nil {
		t.Fatal(err)
	}
	ev, err := he.NewEvaluator(svc.Params(), nil)
	if err != nil {
		t.Fatal(err)
	}
	pki, srv := startPKIWith(t, svc, func(s *rpc.Server) {
		rpc.Register[scoringv1connect.ScoringServiceHandler](s, scoringv1connect.NewScoringServiceHandler, inflating{svc, ev})
		s.Handle(svc.KeyServiceHandler)
	})
	c, err := scoring.NewClient(context.Background(), pki.Client(t, alice, srv), srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.ScoreBlock(context.Background(), ds.X[100:])
	if err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("inflated logits accepted: %v, %v", got, err)
	}
}

// TestMixedKeysRefused: feature vectors encrypted under two different keys in one
// request are refused with failed_precondition instead of scored into garbage.
func TestMixedKeysRefused(t *testing.T) {
	ds, _ := scoring.Synthetic(13, 103, 2)
	m, err := scoring.Train(ds.X[:100], ds.Y[:100], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	params := smallParams(t)
	e := start(t, m, scoring.WithParameters(params))
	key, _ := he.NewClient(params)
	other, _ := he.NewClient(params)
	c := e.client(t, alice, scoring.WithHEClient(key))
	if _, err := c.UploadKeys(context.Background()); err != nil {
		t.Fatal(err)
	}
	mine := encryptColumns(t, key, []float64{1, 2, 3})
	theirs := encryptColumns(t, other, []float64{4, 5, 6})
	_, err = e.raw(t, alice).Score(context.Background(), connect.NewRequest(&scoringv1.ScoreRequest{KeyId: string(c.KeyID()), Features: append(mine, theirs...)}))
	wantCode(t, "features under two keys", err, connect.CodeFailedPrecondition)
}
