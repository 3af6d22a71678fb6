package he

import (
	"bytes"
	"context"
	"errors"
	"math"
	"math/big"
	"math/bits"
	"runtime"
	"sync"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/he/hefloat"
)

// Evaluator computes on encrypted vectors with one client's evaluation keys. lattigo's
// evaluators are not goroutine-safe, so an Evaluator keeps a pool of shallow copies
// (one per worker, GOMAXPROCS by default), or borrows workers from a WorkerPool shared
// by many key sets (WithWorkerPool): it is safe for concurrent use, and a call waits
// for a free worker or for its context. A lattigo panic is recovered into an internal
// error and the worker that panicked is discarded.
type Evaluator struct {
	params  *Parameters
	keys    *EvaluationKeys
	have    *Manifest
	set     rlwe.EvaluationKeySet // nil without keys
	base    *hefloat.Evaluator    // own workers only
	workers chan *evalWorker
	pool    *WorkerPool
}

// WorkerPool is a fixed set of evaluation workers (lattigo evaluators with their
// buffers and an encoder) shared by every Evaluator built WithWorkerPool: it bounds
// the homomorphic operations running at once, and their buffers' memory
// (Memory), however many key sets there are. A Registry makes one for its evaluators.
type WorkerPool struct {
	params   *Parameters
	template func() *hefloat.Evaluator // keyless evaluator the workers are copied from
	workers  chan *evalWorker
	n        int
}

// NewWorkerPool returns a pool of n workers for params, each created on first use.
func NewWorkerPool(params *Parameters, n int) (*WorkerPool, error) {
	if params == nil || n < 1 {
		return nil, invalidf("worker pool: need parameters and at least one worker")
	}
	p := &WorkerPool{params: params, workers: make(chan *evalWorker, n), n: n,
		template: sync.OnceValue(func() *hefloat.Evaluator {
			return hefloat.NewEvaluator(hefloat.Parameters{Parameters: params.p}, nil)
		})}
	for range n {
		p.workers <- nil
	}
	return p, nil
}

// Size returns the number of workers.
func (p *WorkerPool) Size() int { return p.n }

// Params returns the parameters the pool's workers evaluate under.
func (p *WorkerPool) Params() *Parameters { return p.params }

// Memory returns the bytes the pool's buffers take once every worker exists, plus the
// template they are copied from: WorkerMemory(params) x (Size + 1).
func (p *WorkerPool) Memory() int64 { return WorkerMemory(p.params) * int64(p.n+1) }

// WorkerMemory returns the bytes of one evaluation worker's buffers on params, from
// lattigo v5's layout: a degree-2 ciphertext, an inverse-NTT buffer, the basis
// extender's and the CKKS evaluator's and encoder's polynomials (9 polynomials mod Q),
// 6 QP polynomials plus one per RNS decomposition digit, one mod P, and the encoder's
// N complex values and N big.Int pointers; plus a quarter for what is not counted.
func WorkerMemory(params *Parameters) int64 {
	n := int64(params.N())
	q := int64(params.MaxLevel() + 1)
	k := int64(len(params.p.P()))
	digits := int64(params.p.BaseRNSDecompositionVectorSize(params.p.MaxLevelQ(), params.p.MaxLevelP()))
	words := n * (9*q + (6+digits)*(q+k) + k + 1 + 2 + 1)
	return words * 8 * 5 / 4
}

type evalWorker struct {
	eval *hefloat.Evaluator
	enc  *hefloat.Encoder
}

// EvaluatorOption configures NewEvaluator.
type EvaluatorOption interface{ applyEvaluator(*evaluatorConfig) }

type evaluatorOptionFunc func(*evaluatorConfig)

func (f evaluatorOptionFunc) applyEvaluator(c *evaluatorConfig) { f(c) }

type evaluatorConfig struct {
	workers int
	pool    *WorkerPool
}

// WithWorkers sets the number of concurrent evaluations (default GOMAXPROCS).
func WithWorkers(n int) EvaluatorOption {
	return evaluatorOptionFunc(func(c *evaluatorConfig) { c.workers = n })
}

// WithWorkerPool makes the evaluator borrow its workers from pool (shared with other
// key sets) instead of keeping its own; WithWorkers is then ignored.
func WithWorkerPool(pool *WorkerPool) EvaluatorOption {
	return evaluatorOptionFunc(func(c *evaluatorConfig) { c.pool = pool })
}

// NewEvaluator returns an evaluator for params. keys may be nil: operations that need
// a key then fail with failed_precondition naming it.
func NewEvaluator(params *Parameters, keys *EvaluationKeys, opts ...EvaluatorOption) (ev *Evaluator, err error) {
	defer recoverInto(&err, "new evaluator")
	if params == nil {
		return nil, invalidf("nil parameters")
	}
	cfg := evaluatorConfig{workers: runtime.GOMAXPROCS(0)}
	for _, o := range opts {
		o.applyEvaluator(&cfg)
	}
	if cfg.workers < 1 {
		return nil, invalidf("need at least one worker")
	}
	ev = &Evaluator{params: params, keys: keys, have: NewManifest(params)}
	if keys != nil {
		if keys.params.id != params.id {
			return nil, paramMismatch("evaluation keys", keys.params.id, params.id)
		}
		ev.set = keys.set
		ev.have = keys.Manifest()
	}
	if cfg.pool != nil {
		if cfg.pool.params.id != params.id {
			return nil, paramMismatch("worker pool", cfg.pool.params.id, params.id)
		}
		ev.pool = cfg.pool
		return ev, nil
	}
	ev.workers = make(chan *evalWorker, cfg.workers)
	ev.base = hefloat.NewEvaluator(hefloat.Parameters{Parameters: params.p}, ev.set)
	for range cfg.workers {
		ev.workers <- nil // created on first use
	}
	return ev, nil
}

// Params returns the evaluator's parameters.
func (e *Evaluator) Params() *Parameters { return e.params }

// Keys returns the manifest the evaluator's keys satisfy.
func (e *Evaluator) Keys() *Manifest { return e.have }

func (e *Evaluator) do(ctx context.Context, op string, f func(w *evalWorker) error) (err error) {
	workers, base := e.workers, e.base
	if e.pool != nil {
		workers = e.pool.workers
	}
	var w *evalWorker
	select {
	case w = <-workers:
	case <-ctx.Done():
		return ctxErr(ctx)
	}
	healthy := false
	defer func() {
		if healthy {
			workers <- w
		} else {
			workers <- nil
		}
	}()
	defer recoverInto(&err, op)
	if w == nil {
		if e.pool != nil {
			base = e.pool.template()
		}
		w = &evalWorker{eval: base.ShallowCopy(), enc: hefloat.NewEncoder(hefloat.Parameters{Parameters: e.params.p})}
	}
	use := w
	if e.pool != nil && e.set != nil {
		// The pool's worker, with this key set: lattigo shares the buffers.
		use = &evalWorker{eval: w.eval.WithKey(e.set), enc: w.enc}
	}
	err = f(use)
	healthy = true
	return err
}

func ctxErr(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return newErr(KindDeadline, "deadline exceeded waiting for an evaluator")
	}
	return newErr(KindCanceled, "canceled waiting for an evaluator")
}

func (e *Evaluator) check(op string, vs ...*Vector) error {
	var fp []byte
	for _, v := range vs {
		if v == nil || len(v.cts) == 0 {
			return invalidf("%s: nil vector", op)
		}
		if v.params.id != e.params.id {
			return paramMismatch(op+" operand", v.params.id, e.params.id)
		}
		// Vectors under different keys would combine into garbage that decrypts
		// without complaint: refuse them (a vector without a fingerprint, from an
		// older sender, cannot be checked).
		if len(v.fp) != 0 {
			if fp != nil && !bytes.Equal(fp, v.fp) {
				return preconditionf("%s: operands encrypted under different keys (fingerprints %x and %x)", op, fp, v.fp)
			}
			fp = v.fp
		}
	}
	return nil
}

func (e *Evaluator) sameShape(op string, a, b *Vector) error {
	if a.length != b.length {
		return invalidf("%s: vectors of length %d and %d", op, a.length, b.length)
	}
	return nil
}

func needLevels(op string, need int, vs ...*Vector) error {
	for _, v := range vs {
		if have := v.Level(); have < need {
			return levelsf(op, need, have)
		}
	}
	return nil
}

func (e *Evaluator) needRelin(op string) error {
	if !e.have.relin {
		return preconditionf("%s needs the relinearization key, which the evaluation keys lack", op)
	}
	return nil
}

func (e *Evaluator) needRotations(op string, ks ...int) error {
	for _, k := range ks {
		if k%e.params.Slots() == 0 {
			continue
		}
		g := e.params.p.GaloisElementForRotation(k)
		if !e.have.hasGalois(g) {
			return preconditionf("%s needs the Galois key for rotation %d (element %d), which the evaluation keys lack", op, k, g)
		}
	}
	return nil
}

func (m *Manifest) hasGalois(g uint64) bool {
	for _, x := range m.galEls {
		if x == g {
			return true
		}
	}
	return false
}

// sameScale reports whether two scales agree to 2^-30 relative.
func sameScale(a, b rlwe.Scale) bool {
	r, _ := new(big.Float).Quo(&a.Value, &b.Value).Float64()
	return math.Abs(r-1) < 0x1p-30
}

func withScale(ct *rlwe.Ciphertext, s rlwe.Scale) *rlwe.Ciphertext {
	md := *ct.MetaData
	md.Scale = s
	c := *ct
	c.MetaData = &md
	return &c
}

// align brings two ciphertexts to the same level and scale for addition: the one at
// the higher level is multiplied by round(scale_lo * q / scale_hi) and rescaled, so
// its scale matches the other's to about 2^-40.
func (w *evalWorker) align(params *Parameters, a, b *rlwe.Ciphertext) (*rlwe.Ciphertext, *rlwe.Ciphertext, error) {
	if a.Level() == b.Level() {
		if !sameScale(a.Scale, b.Scale) {
			return nil, nil, preconditionf("operands at level %d have different scales 2^%.3f and 2^%.3f", a.Level(), log2Scale(a.Scale), log2Scale(b.Scale))
		}
		return a, withScale(b, a.Scale), nil
	}
	swapped := false
	if a.Level() < b.Level() {
		a, b, swapped = b, a, true
	}
	hi, err := w.lowerTo(params, a, b.Level(), b.Scale)
	if err != nil {
		return nil, nil, err
	}
	if swapped {
		return b, hi, nil
	}
	return hi, b, nil
}

func (w *evalWorker) lowerTo(params *Parameters, ct *rlwe.Ciphertext, level int, scale rlwe.Scale) (*rlwe.Ciphertext, error) {
	out := w.eval.DropLevelNew(ct, ct.Level()-level-1)
	q := new(big.Float).SetUint64(params.p.Q()[level+1])
	t := new(big.Float).Mul(&scale.Value, q)
	t.Quo(t, &ct.Scale.Value)
	t.Add(t, big.NewFloat(0.5))
	ti, _ := t.Int(nil)
	if ti.BitLen() < 20 {
		return nil, preconditionf("cannot align scales 2^%.3f and 2^%.3f", log2Scale(ct.Scale), log2Scale(scale))
	}
	if err := w.eval.Mul(out, ti, out); err != nil {
		return nil, internalf("align: %v", err)
	}
	out.Scale = ct.Scale.Mul(rlwe.NewScale(ti))
	if err := w.eval.Rescale(out, out); err != nil {
		return nil, internalf("align: %v", err)
	}
	out.Scale = scale
	return out, nil
}

// Add returns a + b (same length).
func (e *Evaluator) Add(ctx context.Context, a, b *Vector) (*Vector, error) {
	return e.addSub(ctx, "add", a, b, false)
}

// Sub returns a - b (same length).
func (e *Evaluator) Sub(ctx context.Context, a, b *Vector) (*Vector, error) {
	return e.addSub(ctx, "sub", a, b, true)
}

func (e *Evaluator) addSub(ctx context.Context, op string, a, b *Vector, sub bool) (out *Vector, err error) {
	if err := e.check(op, a, b); err != nil {
		return nil, err
	}
	if err := e.sameShape(op, a, b); err != nil {
		return nil, err
	}
	err = e.do(ctx, op, func(w *evalWorker) error {
		cts := make([]*rlwe.Ciphertext, len(a.cts))
		for i := range a.cts {
			x, y, err := w.align(e.params, a.cts[i], b.cts[i])
			if err != nil {
				return err
			}
			if sub {
				cts[i], err = w.eval.SubNew(x, y)
			} else {
				cts[i], err = w.eval.AddNew(x, y)
			}
			if err != nil {
				return internalf("%s: %v", op, err)
			}
		}
		out = a.derive(cts, a.length, a.dirty || b.dirty)
		if a.Level() == b.Level() && a.noise > 0 && b.noise > 0 {
			out.noise = a.noise + b.noise // an alignment's rescale leaves it unknown
		}
		return nil
	})
	return out, err
}

// Sum returns the element-wise sum of vectors of the same length, for example one
// vector per data owner, all encrypted under one public key.
func (e *Evaluator) Sum(ctx context.Context, vs ...*Vector) (*Vector, error) {
	if len(vs) == 0 {
		return nil, invalidf("sum of no vectors")
	}
	acc := vs[0]
	for _, v := range vs[1:] {
		var err error
		if acc, err = e.Add(ctx, acc, v); err != nil {
			return nil, err
		}
	}
	if err := e.check("sum", acc); err != nil {
		return nil, err
	}
	return acc, nil
}

// AddPlain returns a + values (len(values) == a.Len()).
func (e *Evaluator) AddPlain(ctx context.Context, a *Vector, values []float64) (*Vector, error) {
	return e.plainOp(ctx, "add plaintext", a, values, false)
}

// SubPlain returns a - values (len(values) == a.Len()).
func (e *Evaluator) SubPlain(ctx context.Context, a *Vector, values []float64) (*Vector, error) {
	neg := make([]float64, len(values))
	for i, x := range values {
		neg[i] = -x
	}
	return e.plainOp(ctx, "sub plaintext", a, neg, false)
}

// AddScalar returns a + c on every one of its Len values (padding stays zero).
func (e *Evaluator) AddScalar(ctx context.Context, a *Vector, c float64) (*Vector, error) {
	if a == nil {
		return nil, invalidf("add scalar: nil vector")
	}
	return e.plainOp(ctx, "add scalar", a, constant(a.length, c), false)
}

// MulPlain returns a * values element-wise, then rescales (1 level).
func (e *Evaluator) MulPlain(ctx context.Context, a *Vector, values []float64) (*Vector, error) {
	return e.plainOp(ctx, "mul plaintext", a, values, true)
}

func constant(n int, c float64) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = c
	}
	return out
}

func checkPlain(op string, values []float64, n int) error {
	if len(values) != n {
		return invalidf("%s: %d values for a vector of length %d", op, len(values), n)
	}
	for i, x := range values {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return invalidf("%s: value %d is not finite", op, i)
		}
	}
	return nil
}

func (e *Evaluator) plainOp(ctx context.Context, op string, a *Vector, values []float64, mul bool) (out *Vector, err error) {
	if err := e.check(op, a); err != nil {
		return nil, err
	}
	if err := checkPlain(op, values, a.length); err != nil {
		return nil, err
	}
	if mul {
		if err := needLevels(op, 1, a); err != nil {
			return nil, err
		}
	}
	err = e.do(ctx, op, func(w *evalWorker) error {
		cts := make([]*rlwe.Ciphertext, len(a.cts))
		for i, ct := range a.cts {
			c := chunk(values, i, e.params.Slots())
			var err error
			if mul {
				if cts[i], err = w.eval.MulNew(ct, c); err == nil {
					err = w.eval.Rescale(cts[i], cts[i])
				}
			} else {
				cts[i], err = w.eval.AddNew(ct, c)
			}
			if err != nil {
				return internalf("%s: %v", op, err)
			}
		}
		out = a.derive(cts, a.length, a.dirty && !mul)
		if a.noise > 0 {
			out.noise = a.noise + 0.5 // the plaintext's rounding
			if mul {
				out.noise = ScaledNoiseBound(e.params, a.noise, maxAbs(values)) + 0.5*maxAbs(values)
			}
		}
		return nil
	})
	return out, err
}

// MulScalar returns c * a. An integer c of magnitude below 2^31 costs no level; any
// other c is encoded at the scale of the last prime and rescaled (1 level).
func (e *Evaluator) MulScalar(ctx context.Context, a *Vector, c float64) (out *Vector, err error) {
	if err := e.check("mul scalar", a); err != nil {
		return nil, err
	}
	if math.IsNaN(c) || math.IsInf(c, 0) {
		return nil, invalidf("mul scalar: %v is not finite", c)
	}
	integer := c == math.Trunc(c) && math.Abs(c) < 1<<31
	if !integer {
		if err := needLevels("mul scalar", 1, a); err != nil {
			return nil, err
		}
	}
	err = e.do(ctx, "mul scalar", func(w *evalWorker) error {
		cts := make([]*rlwe.Ciphertext, len(a.cts))
		for i, ct := range a.cts {
			var err error
			if integer {
				cts[i], err = w.eval.MulNew(ct, big.NewInt(int64(c)))
			} else if cts[i], err = w.eval.MulNew(ct, c); err == nil {
				err = w.eval.Rescale(cts[i], cts[i])
			}
			if err != nil {
				return internalf("mul scalar: %v", err)
			}
		}
		out = a.derive(cts, a.length, a.dirty)
		if a.noise > 0 && integer {
			out.noise = a.noise * math.Abs(c)
		} else if a.noise > 0 {
			out.noise = ScaledNoiseBound(e.params, a.noise, c)
		}
		return nil
	})
	return out, err
}

func maxAbs(values []float64) float64 {
	m := 0.0
	for _, x := range values {
		m = max(m, math.Abs(x))
	}
	return m
}

// Mul returns a * b element-wise, relinearized and rescaled (1 level; needs the
// relinearization key).
func (e *Evaluator) Mul(ctx context.Context, a, b *Vector) (out *Vector, err error) {
	if err := e.check("mul", a, b); err != nil {
		return nil, err
	}
	if err := e.sameShape("mul", a, b); err != nil {
		return nil, err
	}
	if err := needLevels("mul", 1, a, b); err != nil {
		return nil, err
	}
	if err := e.needRelin("mul"); err != nil {
		return nil, err
	}
	err = e.do(ctx, "mul", func(w *evalWorker) error {
		cts := make([]*rlwe.Ciphertext, len(a.cts))
		for i := range a.cts {
			ct, err := w.eval.MulRelinNew(a.cts[i], b.cts[i])
			if err == nil {
				err = w.eval.Rescale(ct, ct)
			}
			if err != nil {
				return internalf("mul: %v", err)
			}
			cts[i] = ct
		}
		out = a.derive(cts, a.length, a.dirty || b.dirty)
		return nil
	})
	return out, err
}

// Rotate returns a vector whose slot i holds slot (i+k) mod Slots of a, for a vector
// held in one ciphertext (Len <= Slots). Slots past Len may then hold values: sums
// mask them. Needs the Galois key of rotation k.
func (e *Evaluator) Rotate(ctx context.Context, a *Vector, k int) (out *Vector, err error) {
	if err := e.check("rotate", a); err != nil {
		return nil, err
	}
	if len(a.cts) != 1 {
		return nil, preconditionf("rotate: vector spans %d ciphertexts, rotation needs one", len(a.cts))
	}
	if err := e.needRotations("rotate", k); err != nil {
		return nil, err
	}
	if k%e.params.Slots() == 0 {
		return a.derive([]*rlwe.Ciphertext{a.cts[0].CopyNew()}, a.length, a.dirty), nil
	}
	err = e.do(ctx, "rotate", func(w *evalWorker) error {
		ct, err := w.eval.RotateNew(a.cts[0], k)
		if err != nil {
			return internalf("rotate: %v", err)
		}
		out = a.derive([]*rlwe.Ciphertext{ct}, a.length, a.dirty || a.length < e.params.Slots())
		return nil
	})
	return out, err
}

// clean returns the ciphertexts of v with the slots past Len set to zero: v's own when
// its padding is known to be zero, otherwise multiplied by a 0/1 mask (1 level).
func (e *Evaluator) clean(w *evalWorker, v *Vector) ([]*rlwe.Ciphertext, error) {
	if !v.dirty {
		return v.cts, nil
	}
	if v.Level() < 1 {
		return nil, levelsf("masking the padding", 1, v.Level())
	}
	out := make([]*rlwe.Ciphertext, len(v.cts))
	for i, ct := range v.cts {
		mask := make([]float64, e.params.Slots())
		for j := range v.validSlots(i) {
			mask[j] = 1
		}
		var err error
		if out[i], err = w.eval.MulNew(ct, mask); err == nil {
			err = w.eval.Rescale(out[i], out[i])
		}
		if err != nil {
			return nil, internalf("mask: %v", err)
		}
	}
	return out, nil
}

// cleaned returns v with its padding cleared (see clean).
func (e *Evaluator) cleaned(ctx context.Context, v *Vector) (out *Vector, err error) {
	if !v.dirty {
		return v, nil
	}
	err = e.do(ctx, "mask", func(w *evalWorker) error {
		cts, err := e.clean(w, v)
		if err != nil {
			return err
		}
		out = v.derive(cts, v.length, false)
		return nil
	})
	return out, err
}

// innerSum sums v's values into slot 0 of one ciphertext.
func (e *Evaluator) innerSum(w *evalWorker, v *Vector) (*rlwe.Ciphertext, error) {
	cts, err := e.clean(w, v)
	if err != nil {
		return nil, err
	}
	acc := cts[0]
	for _, ct := range cts[1:] {
		x, y, err := w.align(e.params, acc, ct)
		if err != nil {
			return nil, err
		}
		if acc, err = w.eval.AddNew(x, y); err != nil {
			return nil, internalf("inner sum: %v", err)
		}
	}
	if len(cts) == 1 {
		acc = acc.CopyNew()
	}
	n := min(v.length, e.params.Slots())
	for i := range bits.Len(uint(n - 1)) {
		r, err := w.eval.RotateNew(acc, 1<<i)
		if err != nil {
			return nil, internalf("inner sum: %v", err)
		}
		if err := w.eval.Add(acc, r, acc); err != nil {
			return nil, internalf("inner sum: %v", err)
		}
	}
	return acc, nil
}

func (e *Evaluator) innerSumChecks(op string, v *Vector) error {
	if v.dirty {
		if err := needLevels(op, 1, v); err != nil {
			return err
		}
	}
	return e.needRotations(op, innerSumRotations(e.params, v.length)...)
}

// InnerSum returns a vector of length 1 holding the sum of a's values. It needs the
// keys of NeedInnerSum(a.Len()), and one level when a's padding may be non-zero.
func (e *Evaluator) InnerSum(ctx context.Context, a *Vector) (out *Vector, err error) {
	if err := e.check("inner sum", a); err != nil {
		return nil, err
	}
	if err := e.innerSumChecks("inner sum", a); err != nil {
		return nil, err
	}
	err = e.do(ctx, "inner sum", func(w *evalWorker) error {
		ct, err := e.innerSum(w, a)
		if err != nil {
			return err
		}
		out = a.derive([]*rlwe.Ciphertext{ct}, 1, true)
		return nil
	})
	return out, err
}

// Dot returns the inner product of two encrypted vectors (length 1): Mul then
// InnerSum. Needs relinearization, NeedInnerSum(a.Len()) and 1 level.
func (e *Evaluator) Dot(ctx context.Context, a, b *Vector) (*Vector, error) {
	p, err := e.Mul(ctx, a, b)
	if err != nil {
		return nil, err
	}
	return e.InnerSum(ctx, p)
}

// DotPlain returns the inner product of a with plaintext weights (length 1):
// MulPlain then InnerSum. Needs NeedInnerSum(a.Len()) and 1 level.
func (e *Evaluator) DotPlain(ctx context.Context, a *Vector, weights []float64) (*Vector, error) {
	if err := e.check("dot", a); err != nil {
		return nil, err
	}
	if err := e.needRotations("dot", innerSumRotations(e.params, a.length)...); err != nil {
		return nil, err
	}
	p, err := e.MulPlain(ctx, a, weights)
	if err != nil {
		return nil, err
	}
	return e.InnerSum(ctx, p)
}

// Mean returns the mean of a's values (length 1). Needs NeedInnerSum(a.Len()) and 1
// level (2 if a's padding may be non-zero).
func (e *Evaluator) Mean(ctx context.Context, a *Vector) (*Vector, error) {
	if err := e.check("mean", a); err != nil {
		return nil, err
	}
	need := 1
	if a.dirty {
		need = 2
	}
	if err := needLevels("mean", need, a); err != nil {
		return nil, err
	}
	s, err := e.InnerSum(ctx, a)
	if err != nil {
		return nil, err
	}
	return e.MulScalar(ctx, s, 1/float64(a.length))
}

// Variance returns the population variance of a's values (length 1), computed as
// (n*sum(x^2) - sum(x)^2) / n^2 so that both terms share one level and scale. Needs
// relinearization, NeedInnerSum(a.Len()) and 2 levels (3 if a's padding may be
// non-zero). n*sum(x^2) must stay below 2^(log2 Q_1 - log2 scale - 2).
func (e *Evaluator) Variance(ctx context.Context, a *Vector) (*Vector, error) {
	if err := e.check("variance", a); err != nil {
		return nil, err
	}
	need := 2
	if a.dirty {
		need = 3
	}
	if err := needLevels("variance", need, a); err != nil {
		return nil, err
	}
	if err := e.needRelin("variance"); err != nil {
		return nil, err
	}
	if err := e.innerSumChecks("variance", a); err != nil {
		return nil, err
	}
	// Both terms must reach the subtraction at the same level and scale: clear the
	// padding once, up front, rather than in each inner sum.
	a, err := e.cleaned(ctx, a)
	if err != nil {
		return nil, err
	}
	sq, err := e.Mul(ctx, a, a)
	if err != nil {
		return nil, err
	}
	s2, err := e.InnerSum(ctx, sq)
	if err != nil {
		return nil, err
	}
	s1, err := e.InnerSum(ctx, a)
	if err != nil {
		return nil, err
	}
	s1s1, err := e.Mul(ctx, s1, s1)
	if err != nil {
		return nil, err
	}
	n := float64(a.length)
	ns2, err := e.MulScalar(ctx, s2, n)
	if err != nil {
		return nil, err
	}
	d, err := e.Sub(ctx, ns2, s1s1)
	if err != nil {
		return nil, err
	}
	return e.MulScalar(ctx, d, 1/(n*n))
}

// ElementwiseMean returns the element-wise mean of vectors of the same length (for
// example one per data owner). 1 level.
func (e *Evaluator) ElementwiseMean(ctx context.Context, vs ...*Vector) (*Vector, error) {
	s, err := e.Sum(ctx, vs...)
	if err != nil {
		return nil, err
	}
	return e.MulScalar(ctx, s, 1/float64(len(vs)))
}

// LinearCombination returns sum_j weights[j] * vs[j] + bias, element-wise, in one
// level: the encrypted-feature half of logistic-regression scoring (one vector per
// feature, samples across slots).
func (e *Evaluator) LinearCombination(ctx context.Context, vs []*Vector, weights []float64, bias float64) (out *Vector, err error) {
	if len(vs) == 0 || len(vs) != len(weights) {
		return nil, invalidf("linear combination: %d vectors and %d weights", len(vs), len(weights))
	}
	if err := e.check("linear combination", vs...); err != nil {
		return nil, err
	}
	if err := checkPlain("linear combination", append(append([]float64(nil), weights...), bias), len(weights)+1); err != nil {
		return nil, err
	}
	for _, v := range vs[1:] {
		if err := e.sameShape("linear combination", vs[0], v); err != nil {
			return nil, err
		}
	}
	if err := needLevels("linear combination", 1, vs...); err != nil {
		return nil, err
	}
	level := vs[0].Level()
	for _, v := range vs[1:] {
		level = min(level, v.Level())
	}
	err = e.do(ctx, "linear combination", func(w *evalWorker) error {
		first := vs[0]
		cts := make([]*rlwe.Ciphertext, len(first.cts))
		for i := range first.cts {
			ref := first.cts[i]
			acc := rlwe.NewCiphertext(e.params.p, 1, level)
			*acc.MetaData = *ref.MetaData
			for j, v := range vs {
				ct := v.cts[i]
				if ct.Level() > level {
					var err error
					if ct, err = w.lowerTo(e.params, ct, level, ref.Scale); err != nil {
						return err
					}
				} else if !sameScale(ct.Scale, ref.Scale) {
					return preconditionf("linear combination: operand %d has scale 2^%.3f, operand 0 2^%.3f", j, log2Scale(ct.Scale), log2Scale(ref.Scale))
				}
				ct = withScale(ct, ref.Scale)
				if j == 0 {
					acc.Scale = ref.Scale.Mul(rlwe.NewScale(e.params.p.Q()[level]))
				}
				if err := w.eval.MulThenAdd(ct, weights[j], acc); err != nil {
					return internalf("linear combination: %v", err)
				}
			}
			if err := w.eval.Rescale(acc, acc); err != nil {
				return internalf("linear combination: %v", err)
			}
			switch valid := first.validSlots(i); {
			case bias == 0:
			case valid == e.params.Slots(): // every slot: a constant, no plaintext to encode
				if err := w.eval.Add(acc, bias, acc); err != nil {
					return internalf("linear combination: %v", err)
				}
			default: // the padding slots stay zero
				b := make([]float64, e.params.Slots())
				for s := range valid {
					b[s] = bias
				}
				if err := w.eval.Add(acc, b, acc); err != nil {
					return internalf("linear combination: %v", err)
				}
			}
			cts[i] = acc
		}
		dirty := false
		for _, v := range vs {
			dirty = dirty || v.dirty
		}
		out = first.derive(cts, first.length, dirty)
		return nil
	})
	return out, err
}

func log2Scale(s rlwe.Scale) float64 {
	f, _ := s.Value.Float64()
	return math.Log2(f)
}
