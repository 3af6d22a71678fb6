package he

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/he/hefloat"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"google.golang.org/protobuf/proto"
)

// benchFixture holds, for one preset, the he objects and the raw lattigo objects built
// from the same keys, so that each operation is measured both ways in one run.
type benchFixture struct {
	params *Parameters
	client *Client
	keys   *EvaluationKeys
	ev     *Evaluator
	x, y   *Vector
	w      []float64
	mat    *Matrix

	raw    *hefloat.Evaluator
	rawEnc *hefloat.Encoder
	rawDec *rlwe.Decryptor
	rawLT  hefloat.LinearTransformation
}

var benchFixtures sync.Map // *Parameters -> *benchFixture

func getBench(b *testing.B, p *Parameters) *benchFixture {
	if f, ok := benchFixtures.Load(p); ok {
		return f.(*benchFixture)
	}
	c, err := NewClient(p)
	if err != nil {
		b.Fatal(err)
	}
	keys, err := c.GenEvaluationKeys(NewManifest(p, NeedRelinearization(), NeedInnerSum(p.Slots()), NeedMatVec(16, 16)))
	if err != nil {
		b.Fatal(err)
	}
	ev, _ := NewEvaluator(p, keys, WithWorkers(1))
	r := rand.New(rand.NewPCG(1, 1))
	x, _ := c.Encrypt(randValues(r, p.Slots()))
	y, _ := c.Encrypt(randValues(r, p.Slots()))
	m := make([][]float64, 16)
	for i := range m {
		m[i] = randValues(r, 16)
	}
	mat, _ := NewMatrix(p, m)
	hp := hefloat.Parameters{Parameters: p.p}
	f := &benchFixture{
		params: p, client: c, keys: keys, ev: ev, x: x, y: y, w: randValues(r, p.Slots()), mat: mat,
		raw: hefloat.NewEvaluator(hp, keys.set), rawEnc: hefloat.NewEncoder(hp), rawDec: rlwe.NewDecryptor(p.p, c.sk.sk),
	}
	f.rawLT = hefloat.NewLinearTransformation(p.p, matVecLTParams(p, 16, 16, p.MaxLevel()))
	if err := hefloat.EncodeLinearTransformation[float64](f.rawEnc, mat.diags, f.rawLT); err != nil {
		b.Fatal(err)
	}
	benchFixtures.Store(p, f)
	return f
}

func benchPresets() []*Parameters { return []*Parameters{ParamsN13(), ParamsN14()} }

// BenchmarkOps measures every operation through he and through raw lattigo on the
// same ciphertexts and keys, interleaved (target: he <= 1.05x lattigo).
func BenchmarkOps(b *testing.B) {
	ctx := context.Background()
	for _, p := range benchPresets() {
		b.Run(fmt.Sprintf("N%d", p.LogN()), func(b *testing.B) {
			f := getBench(b, p)
			x0, y0 := f.x.cts[0], f.y.cts[0]
			pair := func(name string, he, raw func() error) {
				b.Run(name, func(b *testing.B) { interleave(b, he, raw) })
			}
			vals := chunk(f.w, 0, p.Slots())
			pair("add", func() error { _, err := f.ev.Add(ctx, f.x, f.y); return err },
				func() error { _, err := f.raw.AddNew(x0, y0); return err })
			pair("add_plain", func() error { _, err := f.ev.AddPlain(ctx, f.x, f.w); return err },
				func() error { _, err := f.raw.AddNew(x0, vals); return err })
			pair("mul_scalar", func() error { _, err := f.ev.MulScalar(ctx, f.x, 0.3); return err },
				func() error {
					ct, err := f.raw.MulNew(x0, 0.3)
					if err == nil {
						err = f.raw.Rescale(ct, ct)
					}
					return err
				})
			pair("mul_plain", func() error { _, err := f.ev.MulPlain(ctx, f.x, f.w); return err },
				func() error {
					ct, err := f.raw.MulNew(x0, vals)
					if err == nil {
						err = f.raw.Rescale(ct, ct)
					}
					return err
				})
			pair("mul_relin_rescale", func() error { _, err := f.ev.Mul(ctx, f.x, f.y); return err },
				func() error {
					ct, err := f.raw.MulRelinNew(x0, y0)
					if err == nil {
						err = f.raw.Rescale(ct, ct)
					}
					return err
				})
			pair("rotate", func() error { _, err := f.ev.Rotate(ctx, f.x, 1); return err },
				func() error { _, err := f.raw.RotateNew(x0, 1); return err })
			pair("inner_sum", func() error { _, err := f.ev.InnerSum(ctx, f.x); return err },
				func() error {
					acc := x0.CopyNew()
					for i := 1; i < p.Slots(); i <<= 1 {
						r, err := f.raw.RotateNew(acc, i)
						if err != nil {
							return err
						}
						if err := f.raw.Add(acc, r, acc); err != nil {
							return err
						}
					}
					return nil
				})
			x16, _ := f.client.Encrypt(f.w[:16])
			pair("matvec_16x16", func() error { _, err := f.ev.MatVec(ctx, f.mat, x16); return err },
				func() error {
					res := rlwe.NewCiphertext(p.p, 1, x16.cts[0].Level())
					if err := hefloat.NewLinearTransformationEvaluator(f.raw).Evaluate(x16.cts[0], f.rawLT, res); err != nil {
						return err
					}
					return f.raw.Rescale(res, res)
				})
			sig, _ := ChebyshevApproximation(Sigmoid, -1, 1, 3)
			pair("poly_deg3", func() error { _, err := f.ev.EvalPolynomial(ctx, f.x, sig); return err },
				func() error {
					_, err := hefloat.NewPolynomialEvaluator(hefloat.Parameters{Parameters: p.p}, f.raw).
						Evaluate(x0, hefloat.NewPolynomial(sig.poly.Clone()), x0.Scale)
					return err
				})
		})
	}
}

// BenchmarkClient measures the client side against raw lattigo, interleaved:
// encryption, and decryption at full level (lattigo's decode, multi-precision CRT) and
// at level 0 (WithMaxAbs). docs/he.md turns the ratios into a comparison with SEAL
// through the SEAL/lattigo ratios measured on the same machine kind.
func BenchmarkClient(b *testing.B) {
	for _, p := range benchPresets() {
		b.Run(fmt.Sprintf("N%d", p.LogN()), func(b *testing.B) {
			f := getBench(b, p)
			vals := f.w
			rawPk := rlwe.NewEncryptor(p.p, f.client.pk.pk)
			rawEncrypt := func() error {
				pt := hefloat.NewPlaintext(hefloat.Parameters{Parameters: p.p}, p.MaxLevel())
				if err := f.rawEnc.Encode(vals, pt); err != nil {
					return err
				}
				_, err := rawPk.EncryptNew(pt)
				return err
			}
			pkEnc, _ := NewEncryptor(f.client.PublicKey())
			b.Run("encrypt_pk", func(b *testing.B) {
				interleave(b, func() error { _, err := pkEnc.Encrypt(vals); return err }, rawEncrypt)
			})
			b.Run("encrypt_sk_seeded_vs_lattigo_pk", func(b *testing.B) {
				interleave(b, func() error { _, err := f.client.Encrypt(vals); return err }, rawEncrypt)
			})
			out := make([]float64, p.Slots())
			rawDecrypt := func() error {
				return f.rawEnc.Decode(f.rawDec.DecryptNew(f.x.cts[0]), out)
			}
			b.Run("decrypt_full_level", func(b *testing.B) {
				interleave(b, func() error { _, err := f.client.Decrypt(f.x); return err }, rawDecrypt)
			})
			b.Run("decrypt_level0_vs_lattigo_full", func(b *testing.B) {
				interleave(b, func() error { _, err := f.client.Decrypt(f.x, WithMaxAbs(1)); return err }, rawDecrypt)
			})
		})
	}
}

// BenchmarkKeyGen measures evaluation-key generation: he (rows and keys in parallel
// on GOMAXPROCS goroutines, seeded) against lattigo's sequential key generator,
// interleaved; a relinearization key alone, and a relinearization key with 6 Galois keys.
func BenchmarkKeyGen(b *testing.B) {
	for _, p := range benchPresets() {
		b.Run(fmt.Sprintf("N%d", p.LogN()), func(b *testing.B) {
			f := getBench(b, p)
			sk := f.client.sk.sk
			rots := innerSumRotations(p, 64) // 6 Galois keys
			galEls := make([]uint64, len(rots))
			for i, r := range rots {
				galEls[i] = p.p.GaloisElementForRotation(r)
			}
			relinOnly := NewManifest(p, NeedRelinearization())
			set := NewManifest(p, NeedRelinearization(), NeedRotations(rots...))
			kgen := rlwe.NewKeyGenerator(p.p)
			b.Run("relin", func(b *testing.B) {
				interleave(b, func() error { _, err := f.client.GenEvaluationKeys(relinOnly); return err },
					func() error { kgen.GenRelinearizationKeyNew(sk); return nil })
			})
			b.Run("relin+6galois", func(b *testing.B) {
				interleave(b, func() error { _, err := f.client.GenEvaluationKeys(set); return err },
					func() error { kgen.GenRelinearizationKeyNew(sk); kgen.GenGaloisKeysNew(galEls, sk); return nil })
			})
		})
	}
}

// BenchmarkPrecision reports, per preset, the maximum absolute error against the
// plaintext computation (inputs uniform in [-1,1], all slots) as the metric max_err_1e-9 (units of 1e-9):
// fresh, after one multiplication, after a degree-7 Chebyshev sigmoid on [-8,8] where
// the depth allows. docs/he.md lists the figures.
func BenchmarkPrecision(b *testing.B) {
	ctx := context.Background()
	for _, p := range Presets() {
		c, err := NewClient(p)
		if err != nil {
			b.Fatal(err)
		}
		keys, err := c.GenEvaluationKeys(NewManifest(p, NeedRelinearization()))
		if err != nil {
			b.Fatal(err)
		}
		ev, _ := NewEvaluator(p, keys)
		r := rand.New(rand.NewPCG(7, 7))
		x, y := randValues(r, p.Slots()), randValues(r, p.Slots())
		cx, _ := c.Encrypt(x)
		cy, _ := c.Encrypt(y)
		report := func(name string, v *Vector, want func(i int) float64) {
			b.Run(fmt.Sprintf("N%d/%s", p.LogN(), name), func(b *testing.B) {
				var got []float64
				for b.Loop() {
					if got, err = c.Decrypt(v); err != nil {
						b.Fatal(err)
					}
				}
				worst := 0.0
				for i := range got {
					worst = max(worst, abs(got[i]-want(i)))
				}
				b.ReportMetric(worst*1e9, "max_err_1e-9")
			})
		}
		report("fresh", cx, func(i int) float64 { return x[i] })
		prod, err := ev.Mul(ctx, cx, cy)
		if err != nil {
			b.Fatal(err)
		}
		report("mul", prod, func(i int) float64 { return x[i] * y[i] })
		sig, _ := SigmoidApproximation(8, 7)
		if p.MaxLevel() >= sig.Depth() {
			scaled, _ := ev.MulScalar(ctx, cx, 8)
			s, err := ev.EvalPolynomial(ctx, scaled, sig)
			if err != nil {
				b.Fatal(err)
			}
			report("sigmoid7_vs_polynomial", s, func(i int) float64 { return sig.Evaluate(8 * x[i]) })
		}
	}
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}

// interleave runs he and raw alternately, so that load from other processes hits both
// alike, and reports their medians (ms) and the ratio he/raw.
func interleave(b *testing.B, he, raw func() error) {
	if err := he(); err != nil { // warm the evaluator's worker
		b.Fatal(err)
	}
	var th, tr []time.Duration
	for b.Loop() {
		t0 := time.Now()
		if err := he(); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := raw(); err != nil {
			b.Fatal(err)
		}
		th, tr = append(th, t1.Sub(t0)), append(tr, time.Since(t1))
	}
	mh, mr := median(th), median(tr)
	b.ReportMetric(float64(mh.Microseconds())/1000, "he_ms")
	b.ReportMetric(float64(mr.Microseconds())/1000, "lattigo_ms")
	b.ReportMetric(float64(mh)/float64(mr), "he/lattigo")
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkDecode measures what a server pays to accept client data: validating and
// expanding a seeded vector (c1 regenerated from its seed) against a full one, and
// parsing an evaluation-key set (uniform halves regenerated), per key.
func BenchmarkDecode(b *testing.B) {
	p := ParamsN13()
	f := getBench(b, p)
	seeded, _ := MarshalVector(f.x)
	sum, err := f.ev.Add(context.Background(), f.x, f.x)
	if err != nil {
		b.Fatal(err)
	}
	full, _ := MarshalVector(sum)
	for name, m := range map[string]*hev1.EncryptedVector{"vector_seeded": seeded, "vector_full": full} {
		b.Run("N13/"+name, func(b *testing.B) {
			b.SetBytes(int64(proto.Size(m)))
			for b.Loop() {
				if _, err := UnmarshalVector(p, m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	data, _ := f.keys.Encode()
	b.Run("N13/evaluation_keys", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			if _, err := ParseEvaluationKeys(p, data); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(f.keys.Manifest().Len()), "ns/key")
	})
}

// BenchmarkCodec measures a fresh seeded vector's trip through the wire form: packing
// on the sender (MarshalVector) and, on the receiver, unpacking and checking c0 and
// regenerating c1 from its seed (UnmarshalVector).
func BenchmarkCodec(b *testing.B) {
	for _, p := range benchPresets() {
		f := getBench(b, p)
		m, err := MarshalVector(f.x)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("N%d/marshal", p.LogN()), func(b *testing.B) {
			for b.Loop() {
				if _, err := MarshalVector(f.x); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("N%d/unmarshal", p.LogN()), func(b *testing.B) {
			for b.Loop() {
				if _, err := UnmarshalVector(p, m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
