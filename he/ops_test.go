package he

import (
	"context"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
)

// Error bounds for ParamsN13, inputs uniform in [-1,1] (docs/he.md lists the measured
// errors next to them). Each bound is about 10x the measured maximum.
const (
	boundFresh  = 1e-7 // measured ~1e-8
	boundMul    = 1e-6 // measured ~1e-7 after mul+relin+rescale
	boundSum100 = 1e-5 // inner sums of 100 values after one mul
)

func TestOpsAgainstPlaintext(t *testing.T) {
	f := mustFixture(t)
	ctx := context.Background()
	r := rand.New(rand.NewPCG(11, 12))
	n := fixtureN
	x, y, w := randValues(r, n), randValues(r, n), randValues(r, n)
	cx, cy := f.enc(t, x), f.enc(t, y)
	ev := f.eval
	zip := func(g func(a, b float64) float64, a, b []float64) []float64 {
		out := make([]float64, len(a))
		for i := range a {
			out[i] = g(a[i], b[i])
		}
		return out
	}
	sum := func(a []float64) float64 {
		s := 0.0
		for _, v := range a {
			s += v
		}
		return s
	}
	mean := sum(x) / float64(n)
	variance := 0.0
	for _, v := range x {
		variance += (v - mean) * (v - mean)
	}
	variance /= float64(n)
	matWant := make([]float64, matRows)
	for i := range matRows {
		for j := range matCols {
			matWant[i] += f.matM[i][j] * x[j]
		}
	}
	cx10 := f.enc(t, x[:matCols])
	rot := make([]float64, n)
	for i := range n {
		if i+3 < n {
			rot[i] = x[i+3]
		}
	}
	type result struct {
		v     *Vector
		err   error
		want  []float64
		bound float64
		level int
	}
	cases := map[string]func() result{
		"add": func() result {
			v, err := ev.Add(ctx, cx, cy)
			return result{v, err, zip(func(a, b float64) float64 { return a + b }, x, y), boundFresh, 2}
		},
		"sub": func() result {
			v, err := ev.Sub(ctx, cx, cy)
			return result{v, err, zip(func(a, b float64) float64 { return a - b }, x, y), boundFresh, 2}
		},
		"add plaintext": func() result {
			v, err := ev.AddPlain(ctx, cx, w)
			return result{v, err, zip(func(a, b float64) float64 { return a + b }, x, w), boundFresh, 2}
		},
		"sub plaintext": func() result {
			v, err := ev.SubPlain(ctx, cx, w)
			return result{v, err, zip(func(a, b float64) float64 { return a - b }, x, w), boundFresh, 2}
		},
		"add scalar": func() result {
			v, err := ev.AddScalar(ctx, cx, 0.75)
			return result{v, err, zip(func(a, _ float64) float64 { return a + 0.75 }, x, x), boundFresh, 2}
		},
		"mul scalar integer": func() result {
			v, err := ev.MulScalar(ctx, cx, -3)
			return result{v, err, zip(func(a, _ float64) float64 { return -3 * a }, x, x), 4 * boundFresh, 2}
		},
		"mul scalar": func() result {
			v, err := ev.MulScalar(ctx, cx, 0.3)
			return result{v, err, zip(func(a, _ float64) float64 { return 0.3 * a }, x, x), boundFresh, 1}
		},
		"mul": func() result {
			v, err := ev.Mul(ctx, cx, cy)
			return result{v, err, zip(func(a, b float64) float64 { return a * b }, x, y), boundMul, 1}
		},
		"mul plaintext": func() result {
			v, err := ev.MulPlain(ctx, cx, w)
			return result{v, err, zip(func(a, b float64) float64 { return a * b }, x, w), boundMul, 1}
		},
		"rotate": func() result {
			v, err := ev.Rotate(ctx, cx, 3)
			return result{v, err, rot, boundFresh, 2}
		},
		"inner sum": func() result {
			v, err := ev.InnerSum(ctx, cx)
			return result{v, err, []float64{sum(x)}, boundSum100, 2}
		},
		"dot": func() result {
			v, err := ev.Dot(ctx, cx, cy)
			return result{v, err, []float64{sum(zip(func(a, b float64) float64 { return a * b }, x, y))}, boundSum100, 1}
		},
		"dot plaintext": func() result {
			v, err := ev.DotPlain(ctx, cx, w)
			return result{v, err, []float64{sum(zip(func(a, b float64) float64 { return a * b }, x, w))}, boundSum100, 1}
		},
		"mean": func() result {
			v, err := ev.Mean(ctx, cx)
			return result{v, err, []float64{mean}, boundMul, 1}
		},
		"variance": func() result {
			v, err := ev.Variance(ctx, cx)
			return result{v, err, []float64{variance}, boundMul, 0}
		},
		"matvec": func() result {
			v, err := ev.MatVec(ctx, f.mat, cx10)
			return result{v, err, matWant, boundMul, 1}
		},
		"sum of three": func() result {
			v, err := ev.Sum(ctx, cx, cy, cx)
			return result{v, err, zip(func(a, b float64) float64 { return 2*a + b }, x, y), boundFresh, 2}
		},
		"elementwise mean": func() result {
			v, err := ev.ElementwiseMean(ctx, cx, cy)
			return result{v, err, zip(func(a, b float64) float64 { return (a + b) / 2 }, x, y), boundFresh, 1}
		},
		"linear combination": func() result {
			v, err := ev.LinearCombination(ctx, []*Vector{cx, cy}, []float64{0.5, -2}, 0.25)
			return result{v, err, zip(func(a, b float64) float64 { return 0.5*a - 2*b + 0.25 }, x, y), boundFresh * 4, 1}
		},
		"mixed levels": func() result {
			// (x*y) + x: the fresh operand is brought down to the product's level and scale.
			p, err := ev.Mul(ctx, cx, cy)
			if err != nil {
				return result{err: err}
			}
			v, err := ev.Add(ctx, p, cx)
			return result{v, err, zip(func(a, b float64) float64 { return a*b + a }, x, y), boundMul, 1}
		},
	}
	for name, run := range cases {
		t.Run(name, func(t *testing.T) {
			res := run()
			if res.err != nil {
				t.Fatal(res.err)
			}
			if res.v.Level() != res.level {
				t.Errorf("level %d, want %d", res.v.Level(), res.level)
			}
			got := f.dec(t, res.v)
			if e := maxErr(t, got, res.want); e > res.bound {
				t.Errorf("max error %g above bound %g", e, res.bound)
			} else {
				t.Logf("max error %.3g", e)
			}
		})
	}
}

func TestPolynomialAndSigmoid(t *testing.T) {
	f := mustFixture(t)
	ctx := context.Background()
	r := rand.New(rand.NewPCG(13, 14))
	x := randValues(r, fixtureN)
	cx := f.enc(t, x)
	// N13 has two levels: a degree-3 polynomial on [-1,1] fits.
	p, err := ChebyshevApproximation(math.Tanh, -1, 1, 3)
	if err != nil {
		t.Fatal(err)
	}
	if p.Depth() != 2 {
		t.Fatalf("depth %d", p.Depth())
	}
	v, err := f.eval.EvalPolynomial(ctx, cx, p)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]float64, len(x))
	approx := 0.0
	for i := range x {
		want[i] = p.Evaluate(x[i])
		approx = max(approx, math.Abs(want[i]-math.Tanh(x[i])))
	}
	if e := maxErr(t, f.dec(t, v), want); e > boundMul {
		t.Errorf("polynomial: error %g against the clear polynomial", e)
	}
	if approx > 0.01 {
		t.Errorf("degree-3 tanh approximation error %g", approx)
	}
	mono, _ := NewPolynomial([]float64{0.5, 0.197, 0, -0.004})
	v, err = f.eval.EvalPolynomial(ctx, cx, mono)
	if err != nil {
		t.Fatal(err)
	}
	for i := range x {
		want[i] = 0.5 + 0.197*x[i] - 0.004*x[i]*x[i]*x[i]
	}
	if e := maxErr(t, f.dec(t, v), want); e > boundMul {
		t.Errorf("monomial polynomial: error %g", e)
	}
	// After a polynomial the padding holds p(0); a sum masks it (one more level).
	if _, err := f.eval.InnerSum(ctx, v); kindOf(err) != KindPrecondition || !strings.Contains(err.Error(), "needs 1 levels, ciphertext has 0") {
		t.Errorf("inner sum of a level-0 dirty vector: %v", err)
	}
	sig, _ := SigmoidApproximation(8, 7)
	if _, err := f.eval.EvalPolynomial(ctx, cx, sig); kindOf(err) != KindPrecondition || !strings.Contains(err.Error(), "needs 4 levels, ciphertext has 2") {
		t.Errorf("sigmoid on N13: %v", err)
	}
}

func TestSigmoidApproximationError(t *testing.T) {
	for _, tc := range []struct {
		bound  float64
		degree int
		max    float64
	}{{8, 3, 0.12}, {8, 7, 0.035}, {8, 15, 0.0035}, {4, 7, 0.002}} {
		p, err := SigmoidApproximation(tc.bound, tc.degree)
		if err != nil {
			t.Fatal(err)
		}
		worst := 0.0
		for i := 0; i <= 2000; i++ {
			x := -tc.bound + 2*tc.bound*float64(i)/2000
			worst = max(worst, math.Abs(p.Evaluate(x)-Sigmoid(x)))
		}
		if worst > tc.max {
			t.Errorf("sigmoid on [-%g,%g] degree %d: max error %g above %g", tc.bound, tc.bound, tc.degree, worst, tc.max)
		}
		t.Logf("sigmoid on [-%g,%g] degree %d: max error %.3g, depth %d", tc.bound, tc.bound, tc.degree, worst, p.Depth())
	}
}

func TestPreconditions(t *testing.T) {
	f := mustFixture(t)
	ctx := context.Background()
	x := f.enc(t, []float64{0.1, 0.2})
	y, _ := f.eval.MulScalar(ctx, x, 0.5)
	z, _ := f.eval.MulScalar(ctx, y, 0.5) // level 0
	if _, err := f.eval.Mul(ctx, z, z); kindOf(err) != KindPrecondition || err.Error() != "he: mul needs 1 levels, ciphertext has 0" {
		t.Errorf("mul at level 0: %v", err)
	}
	if same, err := f.eval.Rotate(ctx, x, -ParamsN13().Slots()); err != nil || maxErr(t, f.dec(t, same), []float64{0.1, 0.2}) > boundFresh {
		t.Errorf("rotation by a multiple of the slots: %v", err)
	}
	if _, err := f.eval.Rotate(ctx, x, 5); kindOf(err) != KindPrecondition || !strings.Contains(err.Error(), "rotation 5") {
		t.Errorf("rotation without key: %v", err)
	}
	noKeys, _ := NewEvaluator(ParamsN13(), nil)
	if _, err := noKeys.Mul(ctx, x, x); kindOf(err) != KindPrecondition || !strings.Contains(err.Error(), "relinearization key") {
		t.Errorf("mul without relinearization key: %v", err)
	}
	if _, err := f.eval.Add(ctx, x, f.enc(t, []float64{1, 2, 3})); kindOf(err) != KindInvalid {
		t.Errorf("length mismatch: %v", err)
	}
	other, _ := NewParameters(Literal{LogN: 12, LogQ: []int{36, 30}, LogP: []int{36}, LogDefaultScale: 30})
	oc, _ := NewClient(other)
	ox, _ := oc.Encrypt([]float64{1})
	if _, err := f.eval.Add(ctx, ox, ox); kindOf(err) != KindPrecondition || !strings.Contains(err.Error(), string(other.ID())) || !strings.Contains(err.Error(), string(ParamsN13().ID())) {
		t.Errorf("parameter mismatch: %v", err)
	}
	if _, err := f.client.Decrypt(ox); kindOf(err) != KindPrecondition {
		t.Errorf("decrypt with other parameters: %v", err)
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	busy, _ := NewEvaluator(ParamsN13(), nil, WithWorkers(1))
	hold := make(chan struct{})
	go func() { _ = busy.do(ctx, "hold", func(*evalWorker) error { <-hold; return nil }) }()
	for len(busy.workers) != 0 {
	}
	if _, err := busy.Add(canceled, x, x); kindOf(err) != KindCanceled {
		t.Errorf("canceled while waiting: %v", err)
	}
	close(hold)
}

func TestEvaluatorRecoversPanics(t *testing.T) {
	f := mustFixture(t)
	ev, _ := NewEvaluator(ParamsN13(), f.keys, WithWorkers(1))
	err := ev.do(context.Background(), "boom", func(*evalWorker) error { panic("lattigo") })
	if kindOf(err) != KindInternal || err.Error() != "he: boom failed" {
		t.Fatalf("panic: %v", err)
	}
	x := f.enc(t, []float64{0.5})
	s, err := ev.Add(context.Background(), x, x)
	if err != nil {
		t.Fatal(err)
	}
	if got := f.dec(t, s); math.Abs(got[0]-1) > boundFresh {
		t.Errorf("after a recovered panic: %v", got)
	}
}

func TestEvaluatorConcurrent(t *testing.T) {
	f := mustFixture(t)
	ctx := context.Background()
	ev, _ := NewEvaluator(ParamsN13(), f.keys, WithWorkers(2))
	r := rand.New(rand.NewPCG(15, 16))
	const calls = 8
	xs := make([][]float64, calls)
	cts := make([]*Vector, calls)
	for i := range xs {
		xs[i] = randValues(r, 16)
		cts[i] = f.enc(t, xs[i])
	}
	var wg sync.WaitGroup
	errs := make([]error, calls)
	outs := make([]*Vector, calls)
	for i := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], errs[i] = ev.Mul(ctx, cts[i], cts[i])
		}()
	}
	wg.Wait()
	for i := range calls {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		want := make([]float64, 16)
		for j, v := range xs[i] {
			want[j] = v * v
		}
		if e := maxErr(t, f.dec(t, outs[i]), want); e > boundMul {
			t.Errorf("call %d: error %g", i, e)
		}
	}
}

func TestManifest(t *testing.T) {
	p := ParamsN13()
	m := NewManifest(p, NeedInnerSum(100), NeedRotations(1, 5, p.Slots()))
	if got := m.Rotations(); len(got) != 8 || got[len(got)-1] > 64 {
		t.Errorf("rotations %v", got)
	}
	if m.Relinearization() || m.Len() != 8 {
		t.Errorf("manifest %v %d", m.Relinearization(), m.Len())
	}
	u, err := m.Union(NewManifest(p, NeedRelinearization()))
	if err != nil || !u.Covers(m) || m.Covers(u) || u.Len() != 9 {
		t.Errorf("union: %v", err)
	}
	back, err := UnmarshalManifest(p, MarshalManifest(u))
	if err != nil || !back.Covers(u) || !u.Covers(back) {
		t.Errorf("manifest round trip: %v", err)
	}
	wire := MarshalManifest(u)
	wire.GaloisElements = append(wire.GaloisElements, 2)
	if _, err := UnmarshalManifest(p, wire); kindOf(err) != KindInvalid {
		t.Errorf("even Galois element: %v", err)
	}
}

// TestDirtyPadding runs the sums on a vector whose padding holds p(0) after a
// polynomial: they must mask it (one more level) and still match the plaintext.
func TestDirtyPadding(t *testing.T) {
	ctx := context.Background()
	p, err := NewParameters(Literal{LogN: 13, LogQ: []int{45, 30, 30, 30, 30}, LogP: []int{45}, LogDefaultScale: 30})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := NewClient(p)
	const n = 20
	keys, err := c.GenEvaluationKeys(NewManifest(p, NeedRelinearization(), NeedInnerSum(n)))
	if err != nil {
		t.Fatal(err)
	}
	ev, _ := NewEvaluator(p, keys)
	r := rand.New(rand.NewPCG(21, 22))
	x := randValues(r, n)
	cx, _ := c.Encrypt(x)
	shift, _ := NewPolynomial([]float64{0.5, 1}) // 0.5 + x: the padding becomes 0.5
	d, err := ev.EvalPolynomial(ctx, cx, shift)
	if err != nil {
		t.Fatal(err)
	}
	sum, mean, sq := 0.0, 0.0, 0.0
	for _, v := range x {
		sum += v + 0.5
	}
	mean = sum / n
	for _, v := range x {
		sq += (v + 0.5 - mean) * (v + 0.5 - mean)
	}
	checks := []struct {
		name string
		op   func() (*Vector, error)
		want float64
	}{
		{"inner sum", func() (*Vector, error) { return ev.InnerSum(ctx, d) }, sum},
		{"mean", func() (*Vector, error) { return ev.Mean(ctx, d) }, mean},
		{"variance", func() (*Vector, error) { return ev.Variance(ctx, d) }, sq / n},
		{"dot", func() (*Vector, error) { return ev.Dot(ctx, d, d) }, sq + n*mean*mean},
	}
	for _, ch := range checks {
		v, err := ch.op()
		if err != nil {
			t.Fatalf("%s: %v", ch.name, err)
		}
		got, err := c.Decrypt(v)
		if err != nil {
			t.Fatal(err)
		}
		if e := math.Abs(got[0] - ch.want); e > 1e-3 {
			t.Errorf("%s: %g, want %g", ch.name, got[0], ch.want)
		} else {
			t.Logf("%s: error %.2g", ch.name, e)
		}
	}
}

// TestLinearCombinationBiasPadding spans a full ciphertext (the bias added as a
// constant) and a partial one (the bias added to the valid slots only): the values are
// right and the padding slots past Len stay zero, as sums over the vector assume.
func TestLinearCombinationBiasPadding(t *testing.T) {
	f := mustFixture(t)
	r := rand.New(rand.NewPCG(13, 14))
	slots := f.client.Params().Slots()
	n := slots + 100
	x, y := randValues(r, n), randValues(r, n)
	v, err := f.eval.LinearCombination(context.Background(), []*Vector{f.enc(t, x), f.enc(t, y)}, []float64{0.5, -2}, 0.25)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]float64, 2*slots) // the valid values, then zero padding
	for i := range n {
		want[i] = 0.5*x[i] - 2*y[i] + 0.25
	}
	if v.dirty {
		t.Fatal("linear combination of clean vectors marked dirty")
	}
	all := v.derive(v.cts, 2*slots, false) // every slot, padding included
	if e := maxErr(t, f.dec(t, all), want); e > boundFresh*4 {
		t.Errorf("max error %g above bound %g", e, boundFresh*4)
	}
}

// TestEncryptScratchLeavesNoValues: the client and the public-key encryptor encode into a
// per-worker scratch plaintext. A short vector encrypted after a full one must not carry the
// full one's values in its padding slots (each of which a later InnerSum would add in, and
// a decryption of the padding would reveal).
func TestEncryptScratchLeavesNoValues(t *testing.T) {
	f := mustFixture(t)
	slots := f.client.Params().Slots()
	full := make([]float64, slots)
	for i := range full {
		full[i] = 0.75
	}
	pkEnc, err := NewEncryptor(f.client.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	for name, encrypt := range map[string]func([]float64) (*Vector, error){
		"client":    f.client.Encrypt,
		"encryptor": pkEnc.Encrypt,
	} {
		if _, err := encrypt(full); err != nil {
			t.Fatal(err)
		}
		short, err := encrypt([]float64{0.5, -0.25, 0.125})
		if err != nil {
			t.Fatal(err)
		}
		want := make([]float64, slots)
		want[0], want[1], want[2] = 0.5, -0.25, 0.125
		all := short.derive(short.cts, slots, false) // every slot, padding included
		if e := maxErr(t, f.dec(t, all), want); e > boundFresh {
			t.Errorf("%s: padding of a short vector after a full one: max error %g above %g", name, e, boundFresh)
		}
	}
}
