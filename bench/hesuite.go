package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/he/hefloat"
	"github.com/tuneinsight/lattigo/v5/utils/bignum"

	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/rpc"
)

// The scoring circuit: encrypted logistic regression over one ciphertext per feature,
// samples across slots. t = sum_j w_j x_j + b (one level), then a low-degree sigmoid
// polynomial. ParamsN14 (6 levels) runs p(t) = 0.5 + 1.576 t - 2.048 t^3, a degree-3
// approximation of sigmoid(8t) on [-1, 1] (two levels). ParamsN13 has two levels in
// all, so after the linear layer only one multiplication fits: it runs p(t) = t * t
// (relinearized), and the report says so.
const (
	scoreService = "veil.bench.v1.ScoreService"
	scoreProc    = "/" + scoreService + "/Score"
)

var sigmoidCoeffs = []float64{0.5, 1.576, 0, -2.048}

type circuit struct {
	params   *he.Parameters
	name     string // n13, n14
	deep     bool   // room for the degree-3 polynomial
	features int
	x        [][]float64 // features x samples
	w        []float64
	b        float64
	want     []float64
}

func newCircuit(name string, params *he.Parameters, features int) *circuit {
	r := rand.New(rand.NewPCG(7, uint64(params.LogN())))
	c := &circuit{params: params, name: name, deep: params.MaxLevel() >= 3, features: features, b: 0.05}
	n := params.Slots()
	c.x = make([][]float64, features)
	c.w = make([]float64, features)
	for j := range features {
		c.w[j] = (r.Float64()*2 - 1) * 0.9 / float64(features)
		c.x[j] = make([]float64, n)
		for i := range n {
			c.x[j][i] = r.Float64()*2 - 1
		}
	}
	c.want = make([]float64, n)
	for i := range n {
		t := c.b
		for j := range features {
			t += c.w[j] * c.x[j][i]
		}
		c.want[i] = c.poly(t)
	}
	return c
}

func (c *circuit) poly(t float64) float64 {
	if !c.deep {
		return t * t
	}
	return sigmoidCoeffs[0] + sigmoidCoeffs[1]*t + sigmoidCoeffs[3]*t*t*t
}

func (c *circuit) describe() string {
	if c.deep {
		return "sum_j w_j x_j + b, then 0.5 + 1.576 t - 2.048 t^3 (degree-3 sigmoid)"
	}
	return "sum_j w_j x_j + b, then t*t (N13 has 2 levels: a degree-3 sigmoid after the linear layer does not fit)"
}

func (c *circuit) check(got []float64) error {
	worst := 0.0
	for i, w := range c.want {
		worst = max(worst, math.Abs(got[i]-w))
	}
	if worst > 1e-3 {
		return fmt.Errorf("he %s: result off by %.2g", c.name, worst)
	}
	return nil
}

// raw is the circuit on lattigo alone: its own keys, secret-key encryption as he's
// client does, one evaluator.
type raw struct {
	c      *circuit
	params hefloat.Parameters
	enc    *hefloat.Encoder
	encr   *rlwe.Encryptor
	// per encrypting goroutine (--he-workers): lattigo's encoders and encryptors are
	// not safe for concurrent use
	encs   []*hefloat.Encoder
	encrs  []*rlwe.Encryptor
	dec    *rlwe.Decryptor
	eval   *hefloat.Evaluator
	poly   hefloat.Polynomial
	bytes  int // serialized ciphertexts of one batch: inputs and result
	phases phases
}

// phases is where one in-process batch spent its time.
type phases struct{ encrypt, compute, decrypt time.Duration }

func newRaw(c *circuit, workers int) (*raw, error) {
	lit := c.params.Literal()
	p, err := hefloat.NewParametersFromLiteral(hefloat.ParametersLiteral{LogN: lit.LogN, LogQ: lit.LogQ, LogP: lit.LogP, LogDefaultScale: lit.LogDefaultScale})
	if err != nil {
		return nil, err
	}
	kg := rlwe.NewKeyGenerator(p)
	sk := kg.GenSecretKeyNew()
	rlk := kg.GenRelinearizationKeyNew(sk)
	r := &raw{
		c: c, params: p, enc: hefloat.NewEncoder(p), encr: rlwe.NewEncryptor(p, sk), dec: rlwe.NewDecryptor(p, sk),
		eval: hefloat.NewEvaluator(p, rlwe.NewMemEvaluationKeySet(rlk)),
		poly: hefloat.NewPolynomial(bignum.NewPolynomial(bignum.Monomial, sigmoidCoeffs, nil)),
	}
	r.encs, r.encrs = []*hefloat.Encoder{r.enc}, []*rlwe.Encryptor{r.encr}
	for range workers - 1 {
		r.encs = append(r.encs, r.enc.ShallowCopy())
		r.encrs = append(r.encrs, r.encr.ShallowCopy())
	}
	return r, nil
}

// inParallel runs f(j) for j in [0, n) on up to workers goroutines (worker w takes
// j = w, w+workers, ...) and returns the first error.
func inParallel(n, workers int, f func(worker, j int) error) error {
	if workers <= 1 {
		for j := range n {
			if err := f(0, j); err != nil {
				return err
			}
		}
		return nil
	}
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range min(workers, n) {
		wg.Go(func() {
			for j := w; j < n; j += workers {
				if errs[w] = f(w, j); errs[w] != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (r *raw) batch() error {
	p := r.params
	t0 := time.Now()
	cts := make([]*rlwe.Ciphertext, r.c.features)
	err := inParallel(r.c.features, len(r.encs), func(w, j int) error {
		pt := hefloat.NewPlaintext(p, p.MaxLevel())
		if err := r.encs[w].Encode(r.c.x[j], pt); err != nil {
			return err
		}
		var err error
		cts[j], err = r.encrs[w].EncryptNew(pt)
		return err
	})
	if err != nil {
		return err
	}
	r.bytes = 0
	for _, ct := range cts {
		r.bytes += ct.BinarySize()
	}
	t1 := time.Now()
	level := cts[0].Level()
	acc := hefloat.NewCiphertext(p, 1, level)
	acc.Scale = cts[0].Scale.Mul(rlwe.NewScale(p.Q()[level]))
	for j, ct := range cts {
		if err := r.eval.MulThenAdd(ct, r.c.w[j], acc); err != nil {
			return err
		}
	}
	if err := r.eval.Rescale(acc, acc); err != nil {
		return err
	}
	if err := r.eval.Add(acc, r.c.b, acc); err != nil {
		return err
	}
	var out *rlwe.Ciphertext
	if r.c.deep {
		var err error
		if out, err = hefloat.NewPolynomialEvaluator(p, r.eval).Evaluate(acc, r.poly, acc.Scale); err != nil {
			return err
		}
	} else {
		sq, err := r.eval.MulRelinNew(acc, acc)
		if err != nil {
			return err
		}
		if err := r.eval.Rescale(sq, sq); err != nil {
			return err
		}
		out = sq
	}
	r.bytes += out.BinarySize()
	t2 := time.Now()
	got := make([]float64, p.MaxSlots())
	if err := r.enc.Decode(r.dec.DecryptNew(out), got); err != nil {
		return err
	}
	r.phases = phases{t1.Sub(t0), t2.Sub(t1), time.Since(t2)}
	return r.c.check(got)
}

// veilHE is the circuit through package he: Client, Evaluator.
type veilHE struct {
	c       *circuit
	workers int // goroutines encrypting a batch's features
	client  *he.Client
	ev      *he.Evaluator
	poly    *he.Polynomial
	phases  phases
}

func newVeilHE(c *circuit, workers int) (*veilHE, error) {
	client, err := he.NewClient(c.params)
	if err != nil {
		return nil, err
	}
	evk, err := client.GenEvaluationKeys(he.NewManifest(c.params, he.NeedRelinearization()))
	if err != nil {
		return nil, err
	}
	ev, err := he.NewEvaluator(c.params, evk)
	if err != nil {
		return nil, err
	}
	poly, err := he.NewPolynomial(sigmoidCoeffs)
	if err != nil {
		return nil, err
	}
	return &veilHE{c: c, workers: workers, client: client, ev: ev, poly: poly}, nil
}

func (v *veilHE) encrypt() ([]*he.Vector, error) {
	xs := make([]*he.Vector, v.c.features)
	err := inParallel(v.c.features, v.workers, func(_, j int) error {
		var err error
		xs[j], err = v.client.Encrypt(v.c.x[j])
		return err
	})
	return xs, err
}

// compute is the server's part.
func (v *veilHE) compute(ctx context.Context, xs []*he.Vector) (*he.Vector, error) {
	t, err := v.ev.LinearCombination(ctx, xs, v.c.w, v.c.b)
	if err != nil {
		return nil, err
	}
	if v.c.deep {
		return v.ev.EvalPolynomial(ctx, t, v.poly)
	}
	return v.ev.Mul(ctx, t, t)
}

func (v *veilHE) decrypt(out *he.Vector) error {
	got, err := v.client.Decrypt(out)
	if err != nil {
		return err
	}
	return v.c.check(got)
}

func (v *veilHE) batch() error {
	t0 := time.Now()
	xs, err := v.encrypt()
	if err != nil {
		return err
	}
	t1 := time.Now()
	out, err := v.compute(context.Background(), xs)
	if err != nil {
		return err
	}
	t2 := time.Now()
	err = v.decrypt(out)
	v.phases = phases{t1.Sub(t0), t2.Sub(t1), time.Since(t2)}
	return err
}

// scoreHandler serves the circuit over RPC: a client stream of one EncryptedVector per
// feature, answered with the encrypted scores.
func scoreHandler(v *veilHE) func(...connect.HandlerOption) (string, http.Handler) {
	return func(opts ...connect.HandlerOption) (string, http.Handler) {
		h := connect.NewClientStreamHandler(scoreProc, func(ctx context.Context, st *connect.ClientStream[hev1.EncryptedVector]) (*connect.Response[hev1.EncryptedVector], error) {
			var xs []*he.Vector
			for st.Receive() {
				x, err := he.UnmarshalVector(v.c.params, st.Msg())
				if err != nil {
					return nil, keys.ConnectError(err)
				}
				xs = append(xs, x)
			}
			if err := st.Err(); err != nil {
				return nil, err
			}
			if len(xs) != v.c.features {
				return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("bench: %d features, want %d", len(xs), v.c.features))
			}
			out, err := v.compute(ctx, xs)
			if err != nil {
				return nil, keys.ConnectError(err)
			}
			m, err := he.MarshalVector(out)
			if err != nil {
				return nil, keys.ConnectError(err)
			}
			return connect.NewResponse(m), nil
		}, opts...)
		mux := http.NewServeMux()
		mux.Handle(scoreProc, h)
		return "/" + scoreService + "/", mux
	}
}

func heSuite(cfg *config) (*Report, error) {
	e, err := newEnv()
	if err != nil {
		return nil, err
	}
	defer e.close()
	rep := newReport("he")
	rep.Config = map[string]any{"features": cfg.features, "reps": cfg.reps, "lattigo": moduleVersion("github.com/tuneinsight/lattigo/v5"),
		"encrypting_goroutines": fmt.Sprintf("%d per batch in every system (raw lattigo, the wrapper and the RPC client alike; --he-workers)", max(cfg.heWorkers, 1)),
		"batch":                 "one ciphertext per feature, all slots (N13: 4096 samples, N14: 8192)",
		"rpc":                   "Veil with PQ sealing strict over loopback mTLS: client stream of one EncryptedVector per feature, one EncryptedVector back",
		"wire":                  "bytes on the TCP connection per batch (TLS, HTTP/2, sealing included) vs lattigo MarshalBinary of the inputs and the result"}
	for _, name := range strings.Split(cfg.presets, ",") {
		var params *he.Parameters
		switch strings.TrimSpace(name) {
		case "n13":
			params = he.ParamsN13()
		case "n14":
			params = he.ParamsN14()
		default:
			return nil, fmt.Errorf("unknown preset %q (n13, n14)", name)
		}
		if err := hePreset(cfg, e, rep, name, params); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	if cfg.onlyList != "" { // profiling one system: the committee systems only when named
		return rep, nil
	}
	if err := heCommittee(cfg, rep); err != nil {
		return nil, fmt.Errorf("committee: %w", err)
	}
	return rep, nil
}

func hePreset(cfg *config, e *env, rep *Report, name string, params *he.Parameters) error {
	c := newCircuit(name, params, cfg.features)
	rep.Config["circuit_"+name] = c.describe()
	workers := max(cfg.heWorkers, 1)
	r, err := newRaw(c, workers)
	if err != nil {
		return err
	}
	v, err := newVeilHE(c, workers)
	if err != nil {
		return err
	}
	counter := new(atomic.Int64)
	srv, err := e.startVeilWith(veilOptions{sealed: true, coalesce: true, wrapListener: func(ln net.Listener) net.Listener { return countingListener{ln, counter} }},
		scoreHandler(v), rpc.WithReadLimit(scoreProc, he.MaxVectorWireSize(params, params.Slots())+1<<16))
	if err != nil {
		return err
	}
	defer srv.stop()
	hc, err := e.veilClient(veilOptions{sealed: true, coalesce: true})
	if err != nil {
		return err
	}
	defer hc.CloseIdleConnections()
	sc := connect.NewClient[hev1.EncryptedVector, hev1.EncryptedVector](hc, srv.url+scoreProc, rpc.ClientOptions()...)
	// The client encrypts the next features while feature j is on its way: --he-workers
	// goroutines (worker w takes features w, w+workers, ...), sent in feature order.
	type encrypted struct {
		m   *hev1.EncryptedVector
		err error
	}
	overRPC := func() error {
		slots := make([]chan encrypted, len(c.x))
		for j := range slots {
			slots[j] = make(chan encrypted, 1) // a worker never blocks, even after a failed send
		}
		for w := range min(workers, len(c.x)) {
			go func() {
				for j := w; j < len(c.x); j += workers {
					ct, err := v.client.Encrypt(c.x[j])
					var m *hev1.EncryptedVector
					if err == nil {
						m, err = he.MarshalVector(ct)
					}
					slots[j] <- encrypted{m, err}
				}
			}()
		}
		st := sc.CallClientStream(context.Background())
		for _, slot := range slots {
			e := <-slot
			if e.err != nil {
				_, _ = st.CloseAndReceive()
				return e.err
			}
			if err := st.Send(e.m); err != nil {
				return err
			}
		}
		res, err := st.CloseAndReceive()
		if err != nil {
			return err
		}
		out, err := he.UnmarshalVector(params, res.Msg)
		if err != nil {
			return err
		}
		return v.decrypt(out)
	}
	systems := []heSystem{
		{newSystem("raw_"+name, "lattigo "+moduleVersion("github.com/tuneinsight/lattigo/v5")+" in process, "+name), r.batch},
		{newSystem("wrapper_"+name, "Veil he in process, "+name), v.batch},
		{newSystem("rpc_"+name, "Veil end to end over sealed RPC, "+name), overRPC},
	}
	systems = selected(cfg, systems, func(s heSystem) (string, func()) { return s.sys.Name, func() {} })
	for _, s := range systems { // warm-up, and the session for the RPC
		if err := s.run(); err != nil {
			return fmt.Errorf("%s: %w", s.sys.Name, err)
		}
	}
	for range cfg.reps {
		for _, s := range systems {
			runtime.GC()
			counter.Store(0)
			t0 := time.Now()
			cpu0 := cpuTime()
			if err := s.run(); err != nil {
				return fmt.Errorf("%s: %w", s.sys.Name, err)
			}
			cpu := cpuTime() - cpu0
			ms := float64(time.Since(t0).Microseconds()) / 1000
			s.sys.add("ms_per_batch", ms)
			s.sys.add("cpu_ms_per_batch", float64(cpu.Microseconds())/1000)
			s.sys.add("samples_per_s", float64(params.Slots())/ms*1000)
			addPhases := func(p phases) {
				s.sys.add("encrypt_ms", float64(p.encrypt.Microseconds())/1000)
				s.sys.add("compute_ms", float64(p.compute.Microseconds())/1000)
				s.sys.add("decrypt_ms", float64(p.decrypt.Microseconds())/1000)
			}
			switch {
			case strings.HasPrefix(s.sys.Name, "wrapper_"):
				addPhases(v.phases)
			case strings.HasPrefix(s.sys.Name, "raw_"):
				addPhases(r.phases)
				s.sys.add("wire_bytes", float64(r.bytes))
			case strings.HasPrefix(s.sys.Name, "rpc_"):
				s.sys.add("wire_bytes", float64(counter.Load()))
			}
			cfg.logf("he %-12s %8.1f ms/batch", s.sys.Name, ms)
		}
	}
	var rawS, wrapS, rpcS *System // nil when --only leaves them out
	for _, s := range systems {
		rep.Systems = append(rep.Systems, s.sys)
		switch {
		case strings.HasPrefix(s.sys.Name, "raw_"):
			rawS = s.sys
		case strings.HasPrefix(s.sys.Name, "wrapper_"):
			wrapS = s.sys
		case strings.HasPrefix(s.sys.Name, "rpc_"):
			rpcS = s.sys
		}
	}
	suffix := "_" + name
	rep.ratio("rpc_vs_raw_ms_per_batch"+suffix, rpcS, "ms_per_batch", rawS, "ms_per_batch")
	rep.ratio("wrapper_vs_raw_ms_per_batch"+suffix, wrapS, "ms_per_batch", rawS, "ms_per_batch")
	rep.ratio("wire_vs_raw_bytes"+suffix, rpcS, "wire_bytes", rawS, "wire_bytes")
	rep.ratio("rpc_vs_raw_cpu_per_batch"+suffix, rpcS, "cpu_ms_per_batch", rawS, "cpu_ms_per_batch")
	rep.ratio("wrapper_vs_raw_cpu_per_batch"+suffix, wrapS, "cpu_ms_per_batch", rawS, "cpu_ms_per_batch")
	if cfg.onlyList != "" { // profiling one system
		return nil
	}
	return heVersusSEAL(cfg, rep, name, params)
}

type heSystem struct {
	sys *System
	run func() error
}
