package scoring_test

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
	scoringv1 "github.com/veilrpc/veil/gen/veil/scoring/v1"
	"github.com/veilrpc/veil/gen/veil/scoring/v1/scoringv1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/internal/testpki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/scoring"
)

const (
	serverID = "spiffe://example.org/scoring"
	alice    = "spiffe://example.org/ns/clinic/sa/alice"
	bob      = "spiffe://example.org/ns/clinic/sa/bob"
	outsider = "spiffe://example.org/outsider"
)

// noiseBound is the documented bound on |p_enc - p_plain| (docs/services.md): the
// server computes the logits exactly and the client the sigmoid, so only the CKKS
// noise remains (a quarter of the logit's error at most).
const noiseBound = 1e-4

// smallParams is a depth-4 set at N=2^13 (LogQ 44 + 32 x 4, LogP 44, scale 2^32,
// log2(QP) 216 of 218 allowed), with a lower scale than ParamsN13: the tests that
// exercise the protocol see more noise than the default parameters give.
func smallParams(t testing.TB) *he.Parameters {
	t.Helper()
	p, err := he.NewParameters(he.Literal{LogN: 13, LogQ: []int{44, 32, 32, 32, 32}, LogP: []int{44}, LogDefaultScale: 32})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// wdbcPath is the repository's copy of wdbc.csv (testdata/README.md), or $VEIL_WDBC.
func wdbcPath(t testing.TB) string {
	t.Helper()
	p := os.Getenv("VEIL_WDBC")
	if p == "" {
		p = filepath.Join("..", "..", "testdata", "wdbc.csv")
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("wdbc.csv not found at %s: %v", p, err)
	}
	return p
}

type env struct {
	pki *testpki.PKI
	srv *testpki.Server
	svc *scoring.Service
}

func start(t testing.TB, m *scoring.Model, opts ...scoring.Option) *env {
	t.Helper()
	svc, err := scoring.New(m, opts...)
	if err != nil {
		t.Fatal(err)
	}
	pki, srv := startPKI(t, svc)
	return &env{pki: pki, srv: srv, svc: svc}
}

// startPKI serves svc to the clinic's identities, with extra server options.
func startPKI(t testing.TB, svc *scoring.Service, extra ...rpc.ServerOption) (*testpki.PKI, *testpki.Server) {
	return startPKIWith(t, svc, svc.Register, extra...)
}

// startPKIWith serves what register mounts, with svc's read limits.
func startPKIWith(t testing.TB, svc *scoring.Service, register func(*rpc.Server), extra ...rpc.ServerOption) (*testpki.PKI, *testpki.Server) {
	t.Helper()
	pki := testpki.New(t, "example.org")
	policy := rpc.NewPolicy().
		MustAllow("/veil.scoring.v1.ScoringService/*", "spiffe://example.org/ns/clinic/sa/*").
		MustAllow("/veil.he.v1.KeyService/*", "spiffe://example.org/ns/clinic/sa/*")
	return pki, pki.Serve(t, serverID, register, append(append(svc.ServerOptions(), rpc.WithPolicy(policy)), extra...)...)
}

func (e *env) client(t testing.TB, id string, opts ...scoring.ClientOption) *scoring.Client {
	t.Helper()
	c, err := scoring.NewClient(context.Background(), e.pki.Client(t, id, e.srv), e.srv.URL, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (e *env) raw(t *testing.T, id string) scoringv1connect.ScoringServiceClient {
	return scoringv1connect.NewScoringServiceClient(e.pki.Client(t, id, e.srv), e.srv.URL, rpc.ClientOptions()...)
}

// compare checks encrypted against plaintext predictions and returns the agreement
// and the largest difference.
func compare(t *testing.T, m *scoring.Model, x [][]float64, got []float64) (agree float64, maxErr float64) {
	t.Helper()
	if len(got) != len(x) {
		t.Fatalf("%d results for %d samples", len(got), len(x))
	}
	same := 0
	for i, row := range x {
		want := m.Predict(row)
		maxErr = max(maxErr, math.Abs(got[i]-want))
		if (got[i] >= 0.5) == (want >= 0.5) {
			same++
		}
	}
	return float64(same) / float64(len(x)), maxErr
}

// ckksNoise returns max |p_enc - p_plain|: with exact logits, the error CKKS adds.
func ckksNoise(t *testing.T, m *scoring.Model, x [][]float64, got []float64) float64 {
	t.Helper()
	var worst float64
	for i, row := range x {
		worst = max(worst, math.Abs(got[i]-m.Predict(row)))
	}
	if worst > noiseBound {
		t.Errorf("CKKS noise %g above %g", worst, noiseBound)
	}
	return worst
}

func TestEncryptedScoringWDBC(t *testing.T) {
	ds, err := scoring.ReadCSVFile(wdbcPath(t))
	if err != nil {
		t.Fatal(err)
	}
	if ds.Len() != 569 || len(ds.X[0]) != 30 {
		t.Fatalf("wdbc has %d samples of %d features", ds.Len(), len(ds.X[0]))
	}
	train, test, err := ds.Split(0.2, 1)
	if err != nil {
		t.Fatal(err)
	}
	m, err := scoring.Train(train.X, train.Y, scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if acc := m.Accuracy(test.X, test.Y); acc < 0.95 {
		t.Fatalf("plaintext test accuracy %.4f below 0.95", acc)
	}
	e := start(t, m)
	var stages = map[string]int{}
	c := e.client(t, alice, scoring.WithProgress(func(p scoring.Progress) { stages[p.Stage]++ }))
	info := c.Info()
	if info.Features != 30 || info.Output != scoringv1.Output_OUTPUT_LOGIT || info.Params.ID() != he.ParamsN13().ID() {
		t.Fatalf("info = %+v", info)
	}
	got, st, err := c.Score(context.Background(), test.X)
	if err != nil {
		t.Fatal(err)
	}
	agree, maxErr := compare(t, m, test.X, got)
	noise := ckksNoise(t, m, test.X, got)
	bound := noiseBound
	t.Logf("wdbc: %d test samples, plaintext accuracy %.4f, agreement %.4f, max |p_enc-p_plain| %.3g (CKKS noise %.3g, bound %.3g), logit bound %.2f",
		test.Len(), m.Accuracy(test.X, test.Y), agree, maxErr, noise, bound, m.LogitBound)
	t.Logf("stats: %+v", st)
	if agree < 0.99 {
		t.Errorf("agreement %.4f below 0.99", agree)
	}
	if maxErr > bound {
		t.Errorf("max |p_enc - p_plain| = %g above %g", maxErr, bound)
	}
	// 30 fresh seeded ciphertexts up (c0 only: a quarter to a half of an unseeded
	// one, depending on the limb packing), one level-1 ciphertext of logits down.
	full := he.MaxVectorWireSize(he.ParamsN13(), 1)
	if !st.KeyUploaded || st.Blocks != 1 || st.Ciphertexts != 30 || st.BytesSent < 30*full/4 || st.BytesSent > 30*(full/2+1024) ||
		st.BytesReceived < 100_000 || st.BytesReceived > full || st.KeyBytes < 1<<19 {
		t.Errorf("stats = %+v", st)
	}
	if stages["upload"] == 0 || stages["encrypt"] != 30 || stages["score"] != 1 {
		t.Errorf("progress stages = %v", stages)
	}
}

func TestManifestAsksExactlyForRelinearization(t *testing.T) {
	ds, _ := scoring.Synthetic(1, 200, 3)
	m, err := scoring.Train(ds.X, ds.Y, scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, m, scoring.WithParameters(smallParams(t)))
	keySvc := hev1connect.NewKeyServiceClient(e.pki.Client(t, alice, e.srv), e.srv.URL, rpc.ClientOptions()...)
	for _, proc := range []string{scoring.ScoreProcedure, scoring.ScoreStreamProcedure} {
		man, err := keys.FetchManifest(context.Background(), keySvc, smallParams(t), proc)
		if err != nil {
			t.Fatal(err)
		}
		if !man.Relinearization() || len(man.GaloisElements()) != 0 || man.Len() != 1 {
			t.Errorf("%s manifest: relin %v, Galois %v", proc, man.Relinearization(), man.GaloisElements())
		}
	}
}

// TestStreamingLargeBatch scores more samples than one ciphertext holds: two blocks
// over ScoreStream, each message one ciphertext, under the default read limit.
func TestStreamingLargeBatch(t *testing.T) {
	params := smallParams(t)
	slots := params.Slots()
	all, err := scoring.Synthetic(7, 400+slots+37, 3)
	if err != nil {
		t.Fatal(err)
	}
	m, err := scoring.Train(all.X[:400], all.Y[:400], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, m, scoring.WithParameters(params))
	if lim := scoring.ReadLimits(params, 3)[scoring.ScoreStreamProcedure]; lim > rpc.DefaultReadLimit {
		t.Fatalf("ScoreStream needs %d bytes per message, above the default limit", lim)
	}
	c := e.client(t, alice)
	big := scoring.Dataset{X: all.X[400:], Y: all.Y[400:]}
	got, st, err := c.Score(context.Background(), big.X)
	if err != nil {
		t.Fatal(err)
	}
	agree, maxErr := compare(t, m, big.X, got)
	noise := ckksNoise(t, m, big.X, got)
	t.Logf("%d samples in %d blocks: agreement %.4f, max error %.3g, CKKS noise %.3g, sent %d B, received %d B", len(big.X), st.Blocks, agree, maxErr, noise, st.BytesSent, st.BytesReceived)
	if st.Blocks != 2 || st.Ciphertexts != 6 {
		t.Errorf("stats = %+v", st)
	}
	if agree < 0.99 || maxErr > noiseBound {
		t.Errorf("agreement %.4f, max error %g", agree, maxErr)
	}
	// A second call reuses the uploaded keys.
	again, st2, err := c.Score(context.Background(), big.X[:5])
	if err != nil {
		t.Fatal(err)
	}
	if st2.KeyUploaded || st2.Blocks != 1 {
		t.Errorf("second call stats = %+v", st2)
	}
	if _, e2 := compare(t, m, big.X[:5], again); e2 > noiseBound {
		t.Errorf("second call error %g", e2)
	}
}

// TestKeysUploadedAgainWhenLost: once the server's registry has dropped the keys
// (expired here), Score gets not_found with the key ID, uploads them again and retries.
func TestKeysUploadedAgainWhenLost(t *testing.T) {
	ds, _ := scoring.Synthetic(4, 105, 2)
	m, err := scoring.Train(ds.X[:100], ds.Y[:100], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	e := start(t, m, scoring.WithParameters(smallParams(t)), scoring.WithRegistryOptions(keys.WithTTL(time.Hour, time.Hour), keys.WithClock(clock)))
	c := e.client(t, alice)
	ctx := context.Background()
	if _, st, err := c.Score(ctx, ds.X[100:]); err != nil || !st.KeyUploaded {
		t.Fatalf("first call: %+v, %v", st, err)
	}
	if _, st, err := c.Score(ctx, ds.X[100:]); err != nil || st.KeyUploaded {
		t.Fatalf("second call: %+v, %v", st, err)
	}
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	got, st, err := c.Score(ctx, ds.X[100:])
	if err != nil || !st.KeyUploaded || st.Sent != 5 {
		t.Fatalf("after expiry: %+v, %v", st, err)
	}
	if agree, maxErr := compare(t, m, ds.X[100:], got); agree < 1 || maxErr > noiseBound {
		t.Errorf("after re-upload: agreement %.2f, max error %g", agree, maxErr)
	}
}

// TestPadding: with WithPadding the server is told of whole blocks only, and the
// client still gets one probability per sample.
func TestPadding(t *testing.T) {
	ds, _ := scoring.Synthetic(5, 105, 2)
	m, err := scoring.Train(ds.X[:100], ds.Y[:100], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, m, scoring.WithParameters(smallParams(t)))
	c := e.client(t, alice, scoring.WithPadding())
	got, st, err := c.Score(context.Background(), ds.X[100:])
	if err != nil {
		t.Fatal(err)
	}
	if st.Samples != 5 || st.Sent != c.Info().Slots || st.Blocks != 1 {
		t.Errorf("stats = %+v", st)
	}
	if agree, maxErr := compare(t, m, ds.X[100:], got); agree < 1 || maxErr > noiseBound {
		t.Errorf("agreement %.2f, max error %g", agree, maxErr)
	}
}

// TestConcurrentScores: one client scores from several goroutines, the first calls
// racing to upload the keys.
func TestConcurrentScores(t *testing.T) {
	ds, _ := scoring.Synthetic(6, 112, 2)
	m, err := scoring.Train(ds.X[:100], ds.Y[:100], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, m, scoring.WithParameters(smallParams(t)))
	// The callback is not synchronized: the race detector fails the test if calls overlap.
	calls := 0
	c := e.client(t, alice, scoring.WithProgress(func(scoring.Progress) { calls++ }))
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x := ds.X[100+4*i : 104+4*i]
			got, _, err := c.Score(context.Background(), x)
			if err != nil || len(got) != len(x) {
				t.Errorf("goroutine %d: %d results, %v", i, len(got), err)
				return
			}
			if agree, maxErr := compare(t, m, x, got); agree < 1 || maxErr > noiseBound {
				t.Errorf("goroutine %d: agreement %.2f, max error %g", i, agree, maxErr)
			}
		}()
	}
	wg.Wait()
	if calls < 3*2+2 {
		t.Errorf("%d progress calls, want at least the encryptions, blocks and an upload", calls)
	}
}

func wantCode(t *testing.T, what string, err error, code connect.Code) {
	t.Helper()
	if connect.CodeOf(err) != code {
		t.Errorf("%s: got %v, want %v", what, err, code)
	}
}

func encryptColumns(t *testing.T, c *he.Client, cols ...[]float64) []*hev1.EncryptedVector {
	t.Helper()
	var out []*hev1.EncryptedVector
	for _, col := range cols {
		v, err := c.Encrypt(col)
		if err != nil {
			t.Fatal(err)
		}
		m, err := he.MarshalVector(v)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

func TestScoringErrors(t *testing.T) {
	ds, _ := scoring.Synthetic(3, 103, 2)
	m, err := scoring.Train(ds.X[:100], ds.Y[:100], scoring.TrainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	params := smallParams(t)
	e := start(t, m, scoring.WithParameters(params))
	ctx := context.Background()
	key, err := he.NewClient(params)
	if err != nil {
		t.Fatal(err)
	}
	c := e.client(t, alice, scoring.WithHEClient(key))
	// The unary call scores a small block.
	x := ds.X[100:]
	got, err := c.ScoreBlock(ctx, x)
	if err != nil {
		t.Fatal(err)
	}
	if agree, maxErr := compare(t, m, x, got); agree < 1 || maxErr > noiseBound {
		t.Errorf("unary: agreement %.2f, max error %g", agree, maxErr)
	}
	id := string(c.KeyID())
	raw := e.raw(t, alice)
	feats := encryptColumns(t, key, []float64{x[0][0], x[1][0], x[2][0]}, []float64{x[0][1], x[1][1], x[2][1]})
	short := encryptColumns(t, key, []float64{1, 2})[0]

	_, err = raw.Score(ctx, connect.NewRequest(&scoringv1.ScoreRequest{KeyId: id, Features: feats[:1]}))
	wantCode(t, "one feature vector for two features", err, connect.CodeInvalidArgument)

	_, err = raw.Score(ctx, connect.NewRequest(&scoringv1.ScoreRequest{KeyId: id, Features: append(feats[:1:1], short)}))
	wantCode(t, "features of different lengths", err, connect.CodeInvalidArgument)

	tooMany := encryptColumns(t, key, make([]float64, c.Info().Slots+1))[0]
	_, err = raw.Score(ctx, connect.NewRequest(&scoringv1.ScoreRequest{KeyId: id, Features: append(feats[:1:1], tooMany)}))
	wantCode(t, "more samples than slots in a unary call", err, connect.CodeInvalidArgument)
	_, err = raw.Score(ctx, connect.NewRequest(&scoringv1.ScoreRequest{KeyId: id, Features: []*hev1.EncryptedVector{tooMany, tooMany}}))
	wantCode(t, "more samples than slots in a unary call", err, connect.CodeInvalidArgument)

	small, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	other := encryptColumns(t, small, []float64{1, 2, 3})[0]
	_, err = raw.Score(ctx, connect.NewRequest(&scoringv1.ScoreRequest{KeyId: id, Features: []*hev1.EncryptedVector{other, other}}))
	wantCode(t, "vectors under other parameters", err, connect.CodeFailedPrecondition)

	missing := "00" + id[2:]
	_, err = raw.Score(ctx, connect.NewRequest(&scoringv1.ScoreRequest{KeyId: missing, Features: feats}))
	wantCode(t, "unknown key ID", err, connect.CodeNotFound)
	if got, ok := keys.IsKeysMissing(err); !ok || string(got) != missing {
		t.Errorf("missing-keys detail = %v, %v", got, ok)
	}

	_, err = e.raw(t, bob).Score(ctx, connect.NewRequest(&scoringv1.ScoreRequest{KeyId: id, Features: feats}))
	wantCode(t, "another identity's keys", err, connect.CodePermissionDenied)

	_, err = e.raw(t, outsider).GetModelInfo(ctx, connect.NewRequest(&scoringv1.GetModelInfoRequest{}))
	wantCode(t, "caller outside the policy", err, connect.CodePermissionDenied)

	// Streams: out of order, short, and too long.
	block := func(b, f uint32, v *hev1.EncryptedVector) *scoringv1.ScoreStreamRequest {
		return &scoringv1.ScoreStreamRequest{Part: &scoringv1.ScoreStreamRequest_Block{Block: &scoringv1.FeatureBlock{Block: b, Feature: f, Values: v}}}
	}
	header := &scoringv1.ScoreStreamRequest{Part: &scoringv1.ScoreStreamRequest_Header{Header: &scoringv1.ScoreStreamHeader{KeyId: id, Samples: 3}}}
	for _, tc := range []struct {
		name string
		msgs []*scoringv1.ScoreStreamRequest
	}{
		{"no header", []*scoringv1.ScoreStreamRequest{block(0, 0, feats[0])}},
		{"features out of order", []*scoringv1.ScoreStreamRequest{header, block(0, 1, feats[1]), block(0, 0, feats[0])}},
		{"stream ends early", []*scoringv1.ScoreStreamRequest{header, block(0, 0, feats[0])}},
		{"wrong block length", []*scoringv1.ScoreStreamRequest{header, block(0, 0, short)}},
		{"extra block", []*scoringv1.ScoreStreamRequest{header, block(0, 0, feats[0]), block(0, 1, feats[1]), block(1, 0, feats[0])}},
	} {
		s := raw.ScoreStream(ctx)
		for _, msg := range tc.msgs {
			if err := s.Send(msg); err != nil {
				break
			}
		}
		_ = s.CloseRequest()
		var err error
		for err == nil {
			_, err = s.Receive()
		}
		_ = s.CloseResponse()
		wantCode(t, "stream: "+tc.name, err, connect.CodeInvalidArgument)
	}
}
