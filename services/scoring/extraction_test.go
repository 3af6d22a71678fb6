package scoring_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	scoringv1 "github.com/veilrpc/veil/gen/veil/scoring/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/services/scoring"
)

// TestSampleQuota: an identity gets its quota of samples per window, counted over
// Score and ScoreStream, then resource_exhausted with the time left in its window as
// the retry hint; another identity is unaffected; the next window allows more.
func TestSampleQuota(t *testing.T) {
	ds, _ := scoring.Synthetic(11, 120, 3)
	m, err := scoring.Train(ds.X[:100], ds.Y[:100], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	e := start(t, m, scoring.WithParameters(smallParams(t)), scoring.WithSampleQuota(12, time.Hour), scoring.WithClock(clock))
	ctx := context.Background()
	a := e.client(t, alice, scoring.WithBusyRetries(0))
	if _, _, err := a.Score(ctx, ds.X[100:108]); err != nil { // 8 of 12
		t.Fatal(err)
	}
	if _, err := a.ScoreBlock(ctx, ds.X[108:112]); err != nil { // 12 of 12
		t.Fatal(err)
	}
	mu.Lock()
	now = now.Add(20 * time.Minute)
	mu.Unlock()
	_, _, err = a.Score(ctx, ds.X[112:113])
	if connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Fatalf("over the quota: %v", err)
	}
	if d, ok := keys.RetryAfter(err); !ok || d != 40*time.Minute {
		t.Errorf("retry hint %v %v, want the 40 minutes left in the window", d, ok)
	}
	if _, err := a.ScoreBlock(ctx, ds.X[112:113]); connect.CodeOf(err) != connect.CodeResourceExhausted {
		t.Errorf("unary over the quota: %v", err)
	}
	if _, _, err := e.client(t, bob).Score(ctx, ds.X[100:110]); err != nil {
		t.Errorf("another identity: %v", err)
	}
	mu.Lock()
	now = now.Add(41 * time.Minute)
	mu.Unlock()
	if _, _, err := a.Score(ctx, ds.X[100:112]); err != nil {
		t.Errorf("next window: %v", err)
	}
}

// TestDecisionOnly: a decision-only server's answers give the class of every sample
// and nothing the client can turn into the logit: the same sample scored twice comes
// back with different magnitudes, each within the announced masking range.
func TestDecisionOnly(t *testing.T) {
	ds, _ := scoring.Synthetic(12, 140, 3)
	m, err := scoring.Train(ds.X[:100], ds.Y[:100], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	params := smallParams(t)
	e := start(t, m, scoring.WithParameters(params), scoring.WithDecisionOnly())
	key, err := he.NewClient(params)
	if err != nil {
		t.Fatal(err)
	}
	c := e.client(t, alice, scoring.WithHEClient(key))
	if c.Info().Output != scoringv1.Output_OUTPUT_DECISION || c.Info().DecisionMaskMax != scoring.DecisionMaskMax {
		t.Fatalf("info %+v", c.Info())
	}
	x := ds.X[100:]
	got, _, err := c.Score(context.Background(), x)
	if err != nil {
		t.Fatal(err)
	}
	for i, row := range x {
		if want := m.Predict(row) >= 0.5; (got[i] == 1) != want || (got[i] != 0 && got[i] != 1) {
			t.Errorf("sample %d: decision %v, plaintext probability %v", i, got[i], m.Predict(row))
		}
	}
	// The raw answers: the same sample twice, masked differently.
	raw := e.raw(t, alice)
	req := &scoringv1.ScoreRequest{KeyId: string(c.KeyID()), Features: encryptColumns(t, key, []float64{x[0][0], x[0][0]}, []float64{x[0][1], x[0][1]}, []float64{x[0][2], x[0][2]})}
	res, err := raw.Score(context.Background(), connect.NewRequest(req))
	if err != nil {
		t.Fatal(err)
	}
	v, err := he.UnmarshalVector(params, res.Msg.GetLogits())
	if err != nil {
		t.Fatal(err)
	}
	y, err := key.Decrypt(v)
	if err != nil {
		t.Fatal(err)
	}
	z := m.Logit(x[0])
	for _, yi := range y {
		r := yi / z
		if r < 1-1e-3 || r > scoring.DecisionMaskMax*(1+1e-3) {
			t.Errorf("masked %v for logit %v: factor %v outside [1, %d]", yi, z, r, scoring.DecisionMaskMax)
		}
	}
	if y[0]/y[1] > 0.999 && y[0]/y[1] < 1.001 {
		t.Errorf("the same sample masked alike twice: %v", y)
	}
}
