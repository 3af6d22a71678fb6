package analytics_test

import (
	"context"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"connectrpc.com/connect"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/internal/testpki"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
)

const (
	serverID = "spiffe://example.org/analytics"
	analyst  = "spiffe://example.org/ns/research/sa/analyst"
	other    = "spiffe://example.org/ns/research/sa/other-analyst"
	outsider = "spiffe://example.org/ns/retail/sa/shop"
)

var owners = []string{
	"spiffe://example.org/ns/hospital/sa/north",
	"spiffe://example.org/ns/hospital/sa/south",
	"spiffe://example.org/ns/hospital/sa/east",
}

// errorBound is the documented bound on |decrypted - plaintext| for every statistic
// of these tests (values in [-50, 150], up to 200 records per owner, ParamsN13):
// measured below 1e-6 (docs/services.md).
const errorBound = 1e-5

type env struct {
	pki *testpki.PKI
	srv *testpki.Server
}

func policy() *rpc.Policy {
	return rpc.NewPolicy().
		MustAllow(analytics.CreateStudyProcedure, "spiffe://example.org/ns/research/sa/*").
		MustAllow(analytics.CloseStudyProcedure, "spiffe://example.org/ns/research/sa/*").
		MustAllow(analytics.GetResultProcedure, "spiffe://example.org/ns/research/sa/*", "spiffe://example.org/ns/hospital/sa/*").
		MustAllow(analytics.GetStudyProcedure, "spiffe://example.org").
		MustAllow(analytics.SubmitProcedure, "spiffe://example.org").
		MustAllow(analytics.JoinCommitteeProcedure, "spiffe://example.org").
		MustAllow(analytics.GetCommitteeProcedure, "spiffe://example.org").
		MustAllow(analytics.PostShamirSharesProcedure, "spiffe://example.org").
		MustAllow(analytics.GetAggregateProcedure, "spiffe://example.org").
		MustAllow(analytics.SubmitReleaseShareProcedure, "spiffe://example.org")
}

func serve(t testing.TB, pki *testpki.PKI, dir string) *testpki.Server {
	t.Helper()
	var opts []analytics.Option
	if dir != "" {
		opts = append(opts, analytics.WithStore(dir))
	}
	svc, err := analytics.New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	return pki.Serve(t, serverID, svc.Register, append(analytics.ServerOptions(he.ParamsN13()), rpc.WithPolicy(policy()))...)
}

// setup starts a service (durable in dir unless empty) and makes the analyst's key.
func setup(t testing.TB, dir string) (*env, *he.Client) {
	t.Helper()
	pki := testpki.New(t, "example.org")
	key, err := he.NewClient(he.ParamsN13())
	if err != nil {
		t.Fatal(err)
	}
	return &env{pki: pki, srv: serve(t, pki, dir)}, key
}

// owner returns an owner client that trusts studies signed by the analyst.
func (e *env) owner(t testing.TB, id string) *analytics.Owner {
	return analytics.NewOwner(e.pki.Client(t, id, e.srv), e.srv.URL, e.pki.Identity(t, id), spiffeid.MatchID(spiffeid.RequireFromString(analyst)))
}

func (e *env) analyst(t testing.TB, id string, key *he.Client) *analytics.Analyst {
	return analytics.NewAnalyst(e.pki.Client(t, id, e.srv), e.srv.URL, key, e.pki.Identity(t, id))
}

// wide is the declared range of the test records (records clamps them to it).
var wide = []analytics.Range{{Min: -50, Max: 150}}

// closeAndResult closes a study and fetches its result.
func closeAndResult(t *testing.T, a *analytics.Analyst, id string, opts ...he.DecryptOption) *analytics.Result {
	t.Helper()
	ctx := context.Background()
	if _, err := a.Close(ctx, id); err != nil {
		t.Fatal(err)
	}
	res, err := a.Result(ctx, id, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func (e *env) raw(t *testing.T, id string) analyticsv1connect.AnalyticsServiceClient {
	return analyticsv1connect.NewAnalyticsServiceClient(e.pki.Client(t, id, e.srv), e.srv.URL, rpc.ClientOptions()...)
}

func records(seed uint64, n, d int) [][]float64 {
	rng := rand.New(rand.NewPCG(seed, 1))
	out := make([][]float64, n)
	for i := range out {
		out[i] = make([]float64, d)
		base := rng.NormFloat64() * 10
		for j := range out[i] {
			out[i][j] = math.Max(-50, math.Min(150, 20*float64(j)+base+rng.NormFloat64()*15))
		}
	}
	return out
}

// plainStats returns the pooled population mean and covariance of all records.
func plainStats(all [][]float64) (mean []float64, cov [][]float64) {
	d := len(all[0])
	mean = make([]float64, d)
	for _, x := range all {
		for j, v := range x {
			mean[j] += v / float64(len(all))
		}
	}
	cov = make([][]float64, d)
	for i := range cov {
		cov[i] = make([]float64, d)
		for _, x := range all {
			for j := range d {
				cov[i][j] += (x[i] - mean[i]) * (x[j] - mean[j]) / float64(len(all))
			}
		}
	}
	return mean, cov
}

func maxDiff(t *testing.T, what string, got, want []float64) float64 {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	var m float64
	for i := range got {
		m = max(m, math.Abs(got[i]-want[i]))
	}
	return m
}

func check(t *testing.T, res *analytics.Result, all [][]float64, submissions int) {
	t.Helper()
	checkWithin(t, res, all, submissions, errorBound)
}

// checkWithin checks a result against the plaintext statistics within bound and
// returns the largest error.
func checkWithin(t *testing.T, res *analytics.Result, all [][]float64, submissions int, bound float64) float64 {
	t.Helper()
	mean, cov := plainStats(all)
	if res.Submissions != uint64(submissions) || res.Count != uint64(len(all)) {
		t.Fatalf("result counts %d submissions, %d records; want %d, %d", res.Submissions, res.Count, submissions, len(all))
	}
	sum := make([]float64, len(mean))
	variance := make([]float64, len(mean))
	for i := range mean {
		sum[i] = mean[i] * float64(len(all))
		variance[i] = cov[i][i]
	}
	worst := max(maxDiff(t, "mean", res.Mean, mean), maxDiff(t, "variance", res.Variance, variance))
	worst = max(worst, maxDiff(t, "sum", res.Sum, sum)/float64(len(all)))
	if res.Covariance != nil {
		for i := range cov {
			worst = max(worst, maxDiff(t, "covariance", res.Covariance[i], cov[i]))
		}
	}
	t.Logf("%d submissions, %d records: max |error| %.3g (mean, variance, covariance, sum/count)", submissions, len(all), worst)
	if worst > bound {
		t.Errorf("max error %g above %g", worst, bound)
	}
	return worst
}

func TestAggregationAcrossOwners(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	const d = 5
	edges := []float64{-50, 0, 25, 50, 75, 100, 150}
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "blood-pressure", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: d, Ranges: wide, Covariance: true, HistogramEdges: edges}); err != nil {
		t.Fatal(err)
	}
	var all [][]float64
	for i, id := range owners {
		recs := records(uint64(i), 50+75*i, d)
		all = append(all, recs...)
		got, err := e.owner(t, id).Submit(ctx, "blood-pressure", "batch-1", recs)
		if err != nil {
			t.Fatal(err)
		}
		if got.Duplicate || got.Submissions != 1 { // its own submissions, never the study's
			t.Fatalf("owner %d: %+v", i, got)
		}
	}
	res := closeAndResult(t, a, "blood-pressure")
	check(t, res, all, len(owners))
	want := analytics.HistogramCounts(all, edges)
	if len(res.Histogram) != d {
		t.Fatalf("histogram has %d coordinates", len(res.Histogram))
	}
	for i, row := range res.Histogram {
		for k, n := range row {
			if float64(n) != want[i*(len(edges)-1)+k] {
				t.Fatalf("histogram[%d][%d] = %d, want %v", i, k, n, want[i*(len(edges)-1)+k])
			}
		}
	}
	if res.HistogramMismatch {
		t.Fatal("honest owners' histograms do not add up to the count")
	}

	// A study without covariance: owners send squares only.
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "weights", OwnerPatterns: []string{owners[0], owners[1]}, Dimension: 3, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	r0, r1 := records(10, 30, 3), records(11, 40, 3)
	for i, r := range [][][]float64{r0, r1} {
		if _, err := e.owner(t, owners[i]).Submit(ctx, "weights", "k", r); err != nil {
			t.Fatal(err)
		}
	}
	res = closeAndResult(t, a, "weights")
	if res.Covariance != nil || res.Histogram != nil || len(res.SecondMoment) != 3 {
		t.Fatalf("squares-only study returned %d second moments, covariance %v", len(res.SecondMoment), res.Covariance != nil)
	}
	check(t, res, append(r0, r1...), 2)
}

func TestDurableAndIdempotent(t *testing.T) {
	dir := t.TempDir()
	e, key := setup(t, dir)
	ctx := context.Background()
	if err := e.analyst(t, analyst, key).CreateStudy(ctx, analytics.StudySpec{ID: "s1", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 2, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	r0, r1 := records(1, 20, 2), records(2, 30, 2)
	if _, err := e.owner(t, owners[0]).Submit(ctx, "s1", "once", r0); err != nil {
		t.Fatal(err)
	}
	// A retry with the same key (re-encrypted, so different bytes) counts once.
	got, err := e.owner(t, owners[0]).Submit(ctx, "s1", "once", r0)
	if err != nil || !got.Duplicate || got.Submissions != 1 {
		t.Fatalf("retry = %+v, %v", got, err)
	}
	// The same key from another owner is another submission.
	if got, err := e.owner(t, owners[1]).Submit(ctx, "s1", "once", r1); err != nil || got.Duplicate || got.Submissions != 1 {
		t.Fatalf("second owner = %+v, %v", got, err)
	}
	files := 0
	err = filepath.WalkDir(dir, func(p string, de os.DirEntry, err error) error {
		if err != nil || de.IsDir() {
			return err
		}
		files++
		fi, err := de.Info()
		if err == nil && fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v", p, fi.Mode().Perm())
		}
		return err
	})
	if err != nil || files != 3 {
		t.Fatalf("store holds %d files (want the study and two submissions): %v", files, err)
	}

	// Restart on the same store: the study and both submissions are back, and the
	// duplicate is still recognised.
	e.srv.Stop()
	e.srv = serve(t, e.pki, dir)
	got, err = e.owner(t, owners[0]).Submit(ctx, "s1", "once", r0)
	if err != nil || !got.Duplicate || got.Submissions != 1 {
		t.Fatalf("retry after restart = %+v, %v", got, err)
	}
	res := closeAndResult(t, e.analyst(t, analyst, key), "s1")
	check(t, res, append(r0, r1...), 2)
	// Flooded decryption (30 bits, 1 query) sized from the noise bound of a mean of two
	// public-key submissions: sigma 2^25.6, about 4e-3 per decrypted value at scale 2^40.
	flooded := closeAndResult(t, e.analyst(t, analyst, key), "s1", he.WithFlooding(30, 1))
	if worst := checkWithin(t, flooded, append(r0, r1...), 2, 0.5); worst < 1e-5 {
		t.Errorf("flooded error %g: no flooding applied", worst)
	}
}

func wantCode(t *testing.T, what string, err error, code connect.Code) {
	t.Helper()
	if connect.CodeOf(err) != code {
		t.Errorf("%s: got %v, want %v", what, err, code)
	}
}

func TestPermissionsAndValidation(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	for _, s := range []analytics.StudySpec{
		{ID: "north-only", OwnerPatterns: []string{owners[0], owners[2]}, Dimension: 2, Ranges: wide},
		{ID: "south-only", OwnerPatterns: []string{owners[1]}, Dimension: 2, Ranges: wide},
	} {
		if err := a.CreateStudy(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	recs := records(3, 10, 2)

	_, err := e.owner(t, outsider).Submit(ctx, "north-only", "k", recs)
	wantCode(t, "unknown owner", err, connect.CodePermissionDenied)
	_, err = e.owner(t, owners[0]).Submit(ctx, "south-only", "k", recs)
	wantCode(t, "wrong study", err, connect.CodePermissionDenied)
	_, err = e.owner(t, owners[0]).Submit(ctx, "no-such-study", "k", recs)
	wantCode(t, "missing study", err, connect.CodePermissionDenied)
	if _, err := e.owner(t, owners[0]).Submit(ctx, "north-only", "k", recs); err != nil {
		t.Fatal(err)
	}
	_, err = e.analyst(t, other, key).Result(ctx, "north-only")
	wantCode(t, "another analyst fetches", err, connect.CodePermissionDenied)
	_, err = e.raw(t, owners[0]).GetResult(ctx, connect.NewRequest(&analyticsv1.GetResultRequest{StudyId: "north-only"}))
	wantCode(t, "an owner fetches", err, connect.CodePermissionDenied)
	_, err = e.raw(t, outsider).GetStudy(ctx, connect.NewRequest(&analyticsv1.GetStudyRequest{StudyId: "north-only"}))
	wantCode(t, "an outsider reads the study", err, connect.CodePermissionDenied)
	err = e.analyst(t, owners[0], key).CreateStudy(ctx, analytics.StudySpec{ID: "x", OwnerPatterns: []string{"spiffe://example.org"}, Dimension: 1, Ranges: wide})
	wantCode(t, "an owner creates a study (policy)", err, connect.CodePermissionDenied)
	_, err = a.Result(ctx, "south-only")
	wantCode(t, "result of an open study", err, connect.CodeFailedPrecondition)
	_, err = a.Close(ctx, "south-only")
	wantCode(t, "close with no submissions", err, connect.CodeFailedPrecondition)
	_, err = e.analyst(t, other, key).Close(ctx, "south-only")
	wantCode(t, "another analyst closes", err, connect.CodePermissionDenied)
	err = a.CreateStudy(ctx, analytics.StudySpec{ID: "north-only", OwnerPatterns: []string{owners[0]}, Dimension: 2, Ranges: wide})
	wantCode(t, "study exists", err, connect.CodeAlreadyExists)
	err = a.CreateStudy(ctx, analytics.StudySpec{ID: "too-wide", OwnerPatterns: []string{owners[0]}, Dimension: 65, Ranges: wide, Covariance: true})
	wantCode(t, "covariance beyond the slots", err, connect.CodeInvalidArgument)
	err = a.CreateStudy(ctx, analytics.StudySpec{ID: "bad-edges", OwnerPatterns: []string{owners[0]}, Dimension: 2, Ranges: wide, HistogramEdges: []float64{0, 1, 1}})
	wantCode(t, "histogram edges not increasing", err, connect.CodeInvalidArgument)
	err = a.CreateStudy(ctx, analytics.StudySpec{ID: "bad-pattern", OwnerPatterns: []string{"not a spiffe id"}, Dimension: 2, Ranges: wide})
	wantCode(t, "bad owner pattern", err, connect.CodeInvalidArgument)

	// Malformed submissions from an authorized owner.
	enc, err := he.NewEncryptor(key.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	vec := func(enc *he.Encryptor, n int) *hev1.EncryptedVector {
		v, err := enc.Encrypt(make([]float64, n))
		if err != nil {
			t.Fatal(err)
		}
		m, err := he.MarshalVector(v)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	raw := e.raw(t, owners[0])
	_, err = raw.Submit(ctx, connect.NewRequest(&analyticsv1.SubmitRequest{StudyId: "north-only", IdempotencyKey: "w", Count: 1, Sums: vec(enc, 3), Products: vec(enc, 2)}))
	wantCode(t, "wrong dimension", err, connect.CodeInvalidArgument)
	_, err = raw.Submit(ctx, connect.NewRequest(&analyticsv1.SubmitRequest{StudyId: "north-only", IdempotencyKey: "h", Count: 1, Sums: vec(enc, 2), Products: vec(enc, 2), Histogram: vec(enc, 2)}))
	wantCode(t, "histogram for a study without one", err, connect.CodeInvalidArgument)
	otherKey, err := he.NewClient(he.ParamsN14())
	if err != nil {
		t.Fatal(err)
	}
	otherEnc, _ := he.NewEncryptor(otherKey.PublicKey())
	_, err = raw.Submit(ctx, connect.NewRequest(&analyticsv1.SubmitRequest{StudyId: "north-only", IdempotencyKey: "p", Count: 1, Sums: vec(otherEnc, 2), Products: vec(otherEnc, 2)}))
	wantCode(t, "other parameters", err, connect.CodeFailedPrecondition)
	// Nothing malformed was counted.
	recs2 := records(4, 12, 2)
	if _, err := e.owner(t, owners[2]).Submit(ctx, "north-only", "k", recs2); err != nil {
		t.Fatal(err)
	}
	check(t, closeAndResult(t, a, "north-only"), append(recs, recs2...), 2)
}

// Issue 18: the mean is the decrypted sum divided by the record count in the clear,
// not the server's product by 1/count (whose constant is rounded at the level's
// 40-bit prime: a relative error of about count/2^41). Two owners claim 2^20 records
// in all (synthetic sums: the server cannot tell), with means up to 150: the server's
// mean is off by up to 150 x 2^-21 = 7e-5 (measured 4e-5), the clear division only by
// the sum's decryption error / 2^20.
func TestMeanInTheClear(t *testing.T) {
	e, key := setup(t, "")
	ctx := context.Background()
	a := e.analyst(t, analyst, key)
	if err := a.CreateStudy(ctx, analytics.StudySpec{ID: "large", OwnerPatterns: []string{"spiffe://example.org/ns/hospital/sa/*"}, Dimension: 3, Ranges: wide}); err != nil {
		t.Fatal(err)
	}
	counts := []uint64{1<<19 + 12345, 1<<19 - 12345}
	means := [][]float64{{149.9, -12.345678, 37.1234567}, {143.21, -49.9, 0.0001}}
	variances := []float64{20.5, 300.25, 1.75}
	var total uint64
	wantSum, wantSq := make([]float64, 3), make([]float64, 3)
	for o, c := range counts {
		n := float64(c)
		sums, squares := make([]float64, 3), make([]float64, 3)
		for j, m := range means[o] {
			sums[j] = n * m
			squares[j] = n * (variances[j] + m*m)
			wantSum[j] += sums[j]
			wantSq[j] += squares[j]
		}
		total += c
		req := encryptedSubmission(t, key.PublicKey(), "large", "k", c, sums, squares)
		if _, err := e.raw(t, owners[o]).Submit(ctx, connect.NewRequest(req)); err != nil {
			t.Fatal(err)
		}
	}
	n := float64(total)
	wantMean, wantVar := make([]float64, 3), make([]float64, 3)
	for j := range wantSum {
		wantMean[j] = wantSum[j] / n
		wantVar[j] = wantSq[j]/n - wantMean[j]*wantMean[j]
	}
	res := closeAndResult(t, a, "large")
	if res.Count != 1<<20 {
		t.Fatalf("count %d, want 2^20", res.Count)
	}
	meanErr := maxDiff(t, "mean", res.Mean, wantMean)
	varErr := maxDiff(t, "variance", res.Variance, wantVar)

	// The server's homomorphic mean, which a reader from before sums_only still gets.
	old, err := e.raw(t, analyst).GetResult(ctx, connect.NewRequest(&analyticsv1.GetResultRequest{StudyId: "large"}))
	if err != nil {
		t.Fatal(err)
	}
	v, err := he.UnmarshalVector(key.Params(), old.Msg.GetMean())
	if err != nil {
		t.Fatal(err)
	}
	oldMean, err := key.Decrypt(v)
	if err != nil {
		t.Fatal(err)
	}
	oldErr := maxDiff(t, "server mean", oldMean, wantMean)
	t.Logf("count 2^20: max |mean error| in the clear %.3g (variance %.3g); server's homomorphic mean %.3g", meanErr, varErr, oldErr)
	// The decryption error of a sum of two fresh encryptions is below 1e-5 absolute
	// (docs/services.md); divided by 2^20 it is below 1e-11. The variance subtracts
	// the squared mean (up to 2.2e4) from the second moment: allow 1e-9.
	if meanErr > 1e-11 || varErr > 1e-9 {
		t.Errorf("mean error %g (bound 1e-11), variance error %g (bound 1e-9)", meanErr, varErr)
	}
}
