package he

import (
	"context"
	"encoding/gob"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/he/hefloat"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"google.golang.org/protobuf/proto"
)

// fixture is one client with keys for every test operation on ParamsN13, built once.
type fixture struct {
	client *Client
	keys   *EvaluationKeys
	eval   *Evaluator
	mat    *Matrix
	matM   [][]float64
}

const (
	matRows, matCols = 6, 10
	fixtureN         = 100 // length used by vector tests
)

var getFixture = sync.OnceValues(func() (*fixture, error) {
	p := ParamsN13()
	c, err := NewClient(p)
	if err != nil {
		return nil, err
	}
	m := NewManifest(p, NeedRelinearization(), NeedInnerSum(p.Slots()), NeedRotations(3), NeedMatVec(matRows, matCols))
	keys, err := c.GenEvaluationKeys(m)
	if err != nil {
		return nil, err
	}
	ev, err := NewEvaluator(p, keys)
	if err != nil {
		return nil, err
	}
	r := rand.New(rand.NewPCG(1, 2))
	mm := make([][]float64, matRows)
	for i := range mm {
		mm[i] = randValues(r, matCols)
	}
	mat, err := NewMatrix(p, mm)
	if err != nil {
		return nil, err
	}
	return &fixture{client: c, keys: keys, eval: ev, mat: mat, matM: mm}, nil
})

func mustFixture(t testing.TB) *fixture {
	t.Helper()
	f, err := getFixture()
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func randValues(r *rand.Rand, n int) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = 2*r.Float64() - 1
	}
	return out
}

func maxErr(t testing.TB, got, want []float64) float64 {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d values, want %d", len(got), len(want))
	}
	m := 0.0
	for i := range got {
		m = max(m, math.Abs(got[i]-want[i]))
	}
	return m
}

func (f *fixture) enc(t testing.TB, v []float64) *Vector {
	t.Helper()
	x, err := f.client.Encrypt(v)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

func (f *fixture) dec(t testing.TB, v *Vector, opts ...DecryptOption) []float64 {
	t.Helper()
	x, err := f.client.Decrypt(v, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

func TestPresets(t *testing.T) {
	seen := map[ParamID]bool{}
	for _, p := range Presets() {
		bound, ok := MaxLogQP(p.LogN())
		if !ok || p.LogQP() > float64(bound) || p.Insecure() {
			t.Errorf("%v: log2(QP) %.1f above the 128-bit bound %d", p, p.LogQP(), bound)
		}
		if len(p.ID()) != 32 || seen[p.ID()] {
			t.Errorf("%v: bad or duplicate ID", p)
		}
		seen[p.ID()] = true
		again, err := NewParameters(p.Literal())
		if err != nil || again.ID() != p.ID() {
			t.Errorf("%v: ID not stable: %v %v", p, again, err)
		}
		if p.MaxLevel() != len(p.Literal().LogQ)-1 || p.Slots() != p.N()/2 {
			t.Errorf("%v: depth %d slots %d", p, p.MaxLevel(), p.Slots())
		}
	}
	if ParamsN13().MaxLevel() != 2 || ParamsN14().MaxLevel() != 6 || ParamsN15().MaxLevel() != 14 {
		t.Error("preset depths changed")
	}
}

func TestParametersBound(t *testing.T) {
	over := Literal{LogN: 14, LogQ: []int{55, 45, 45, 45, 45, 45, 45}, LogP: []int{61, 61}, LogDefaultScale: 45}
	_, err := NewParameters(over)
	if kindOf(err) != KindInvalid || !strings.Contains(err.Error(), "exceeds the 128-bit bound 438") {
		t.Fatalf("over-bound parameters: %v", err)
	}
	over.InsecureForTests = true
	p, err := NewParameters(over)
	if err != nil || !p.Insecure() {
		t.Fatalf("insecure-for-tests parameters: %v", err)
	}
	other, _ := NewParameters(Literal{LogN: 13, LogQ: []int{60, 40, 40}, LogP: []int{60}, LogDefaultScale: 39})
	if other == nil || other.ID() == ParamsN13().ID() {
		t.Fatal("a different scale must give a different parameter ID")
	}
	for _, bad := range []Literal{
		{LogN: 9, LogQ: []int{40}, LogP: []int{40}, LogDefaultScale: 20},
		{LogN: 13, LogP: []int{60}, LogDefaultScale: 40},
		{LogN: 13, LogQ: []int{60, 70}, LogP: []int{60}, LogDefaultScale: 40},
		{LogN: 13, LogQ: []int{40, 40}, LogP: []int{60}, LogDefaultScale: 40},
		{LogN: 13, LogQ: []int{60, 40, 40}, LogP: []int{50}, LogDefaultScale: 40}, // P below a group
		{LogN: 14, LogQ: []int{50, 50, 50, 50}, LogP: []int{50, 45}, LogDefaultScale: 40},
	} {
		if _, err := NewParameters(bad); kindOf(err) != KindInvalid {
			t.Errorf("%+v: %v", bad, err)
		}
	}
}

func TestEncryptDecrypt(t *testing.T) {
	f := mustFixture(t)
	slots := f.client.Params().Slots()
	r := rand.New(rand.NewPCG(3, 4))
	for _, n := range []int{1, 7, slots, slots + 5, 2*slots + 1} {
		want := randValues(r, n)
		v := f.enc(t, want)
		if v.Len() != n || v.Ciphertexts() != (n+slots-1)/slots || v.Level() != 2 {
			t.Fatalf("n=%d: len %d, %d ciphertexts, level %d", n, v.Len(), v.Ciphertexts(), v.Level())
		}
		if e := maxErr(t, f.dec(t, v), want); e > 1e-7 {
			t.Errorf("n=%d: fresh error %g", n, e)
		}
		if e := maxErr(t, f.dec(t, v, WithMaxAbs(1)), want); e > 1e-7 {
			t.Errorf("n=%d: level-0 decrypt error %g", n, e)
		}
	}
	if _, err := f.client.Encrypt(nil); kindOf(err) != KindInvalid {
		t.Errorf("empty vector: %v", err)
	}
	if _, err := f.client.Encrypt([]float64{1, math.NaN()}); kindOf(err) != KindInvalid {
		t.Errorf("NaN: %v", err)
	}
}

func TestDecryptLevel(t *testing.T) {
	p := ParamsN13()
	s := rlweScale(p.DefaultScale())
	if l := p.decryptLevel(1, 0, &s); l != 0 {
		t.Errorf("|x|<=1 decrypts at level %d, want 0", l)
	}
	if l := p.decryptLevel(p.LevelZeroMaxAbs()*4, 0, &s); l != 1 {
		t.Errorf("above LevelZeroMaxAbs decrypts at level %d, want 1", l)
	}
	f := mustFixture(t)
	big := []float64{3e4, -2e4, 1e3}
	v := f.enc(t, big)
	if e := maxErr(t, f.dec(t, v, WithMaxAbs(4e4)), big); e > 1e-5 {
		t.Errorf("large values with a declared bound: error %g", e)
	}
}

func TestPublicKeyEncryption(t *testing.T) {
	f := mustFixture(t)
	wire, err := MarshalPublicKey(f.client.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	pk, err := UnmarshalPublicKey(ParamsN13(), wire)
	if err != nil {
		t.Fatal(err)
	}
	owner, err := NewEncryptor(pk)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(5, 6))
	want := randValues(r, 50)
	v, err := owner.Encrypt(want)
	if err != nil {
		t.Fatal(err)
	}
	if e := maxErr(t, f.dec(t, v), want); e > 1e-6 {
		t.Errorf("public-key encryption error %g", e)
	}
	bad := proto.Clone(wire).(*hev1.PublicKey)
	bad.A = bad.A[:len(bad.A)-8]
	if _, err := UnmarshalPublicKey(ParamsN13(), bad); kindOf(err) != KindInvalid {
		t.Errorf("truncated public key: %v", err)
	}
}

func TestNoiseFlooding(t *testing.T) {
	f := mustFixture(t)
	r := rand.New(rand.NewPCG(7, 8))
	want := randValues(r, 2000)
	v := f.enc(t, want)
	plain := maxErr(t, f.dec(t, v), want)
	const sec, queries = 30, 4
	sigma := FloodingSigma(v.NoiseBound(), sec, queries)
	if want := math.Sqrt(64*queries) * math.Exp2(sec/2) * v.NoiseBound(); sigma != want {
		t.Fatalf("sigma %g, want %g", sigma, want)
	}
	flooded := maxErr(t, f.dec(t, v, WithFlooding(sec, queries)), want)
	// per-slot standard deviation is about sigma * sqrt(N/2) / scale; 2000 slots stay within 6 of them
	slot := sigma * math.Sqrt(float64(ParamsN13().N())/2) / ParamsN13().DefaultScale()
	t.Logf("noise bound 2^%.1f, sigma 2^%.1f: error %.3g flooded, %.3g plain", math.Log2(v.NoiseBound()), math.Log2(sigma), flooded, plain)
	if flooded < 100*plain || flooded > 6*slot {
		t.Errorf("flooded error %g (plain %g, slot sigma %g)", flooded, plain, slot)
	}
	// A vector from the wire has no bound Decrypt can trust: it must be declared.
	m, err := MarshalVector(v)
	if err != nil {
		t.Fatal(err)
	}
	wire, err := UnmarshalVector(ParamsN13(), m)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.Decrypt(wire, WithFlooding(sec, queries)); kindOf(err) != KindInvalid {
		t.Errorf("flooding without a bound: %v", err)
	}
	if _, err := f.client.Decrypt(wire, WithFlooding(sec, queries), WithNoiseBound(v.NoiseBound())); err != nil {
		t.Errorf("flooding with a declared bound: %v", err)
	}
	if _, err := f.client.Decrypt(v, WithFlooding(8, 1)); kindOf(err) != KindInvalid {
		t.Errorf("8-bit flooding: %v", err)
	}
	// Flooding that does not fit the remaining modulus is refused, not wrapped around.
	if _, err := f.client.Decrypt(v, WithFlooding(128, 1<<32), WithNoiseBound(1<<40)); kindOf(err) != KindPrecondition {
		t.Errorf("flooding beyond the modulus: %v", err)
	}
}

// The tracked noise bound holds: the measured error of every coefficient (fresh
// public-key encryptions, their sum, a scalar product) stays below it.
func TestNoiseBoundHolds(t *testing.T) {
	f := mustFixture(t)
	p := ParamsN13()
	owner, err := NewEncryptor(f.client.PublicKey())
	if err != nil {
		t.Fatal(err)
	}
	ev, err := NewEvaluator(p, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(9, 10))
	var vs []*Vector
	var sum, first []float64
	for range 10 {
		x := randValues(r, p.Slots())
		if first == nil {
			first = x
		}
		v, err := owner.Encrypt(x)
		if err != nil {
			t.Fatal(err)
		}
		vs = append(vs, v)
		if sum == nil {
			sum = make([]float64, len(x))
		}
		for i := range x {
			sum[i] += x[i]
		}
	}
	total, err := ev.Sum(context.Background(), vs...)
	if err != nil {
		t.Fatal(err)
	}
	mean, err := ev.MulScalar(context.Background(), total, 0.1)
	if err != nil {
		t.Fatal(err)
	}
	avg := make([]float64, len(sum))
	for i := range sum {
		avg[i] = sum[i] / 10
	}
	for _, c := range []struct {
		name   string
		v      *Vector
		values []float64
		bound  float64
	}{
		{"fresh", vs[0], first, FreshNoiseBound(p)},
		{"sum of 10", total, sum, SumNoiseBound(FreshNoiseBound(p), 10)},
		{"sum times 0.1", mean, avg, ScaledNoiseBound(p, SumNoiseBound(FreshNoiseBound(p), 10), 0.1)},
	} {
		if math.Abs(c.v.NoiseBound()-c.bound) > 1e-9*c.bound {
			t.Errorf("%s: tracked bound %g, want %g", c.name, c.v.NoiseBound(), c.bound)
		}
		got := coefficientError(t, f.client, c.v, c.values)
		t.Logf("%s: max coefficient error 2^%.1f, bound 2^%.1f", c.name, math.Log2(got), math.Log2(c.bound))
		if got > c.bound {
			t.Errorf("%s: error %g above the bound %g", c.name, got, c.bound)
		}
	}
}

// coefficientError returns the largest |coefficient| of decrypt(v) - encode(values),
// read from the first prime (centered).
func coefficientError(t *testing.T, c *Client, v *Vector, values []float64) float64 {
	t.Helper()
	ct := v.cts[0]
	w := c.pool.Get().(*clientWorker)
	defer c.pool.Put(w)
	pt := hefloat.NewPlaintext(hefloat.Parameters{Parameters: c.params.p}, ct.Level())
	w.dec.Decrypt(ct, pt)
	want := hefloat.NewPlaintext(hefloat.Parameters{Parameters: c.params.p}, ct.Level())
	want.Scale = ct.Scale
	if err := w.enc.Encode(values, want); err != nil {
		t.Fatal(err)
	}
	ringQ := c.params.p.RingQ().AtLevel(ct.Level())
	ringQ.Sub(pt.Value, want.Value, pt.Value)
	ringQ.INTT(pt.Value, pt.Value)
	q := c.params.p.Q()[0]
	worst := 0.0
	for _, x := range pt.Value.Coeffs[0] {
		d := float64(x)
		if x > q/2 {
			d = float64(q - x)
		}
		worst = max(worst, d)
	}
	return worst
}

func TestSecretKeyNeverSerialized(t *testing.T) {
	f := mustFixture(t)
	sk := f.client.SecretKey()
	if _, err := json.Marshal(sk); err == nil {
		t.Error("json.Marshal accepted the secret key")
	}
	if err := gob.NewEncoder(&strings.Builder{}).Encode(sk); err == nil {
		t.Error("gob accepted the secret key")
	}
	if _, err := sk.MarshalBinary(); err == nil {
		t.Error("MarshalBinary accepted the secret key")
	}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%d"} {
		if s := fmt.Sprintf(verb, sk); s != "he.SecretKey(REDACTED)" {
			t.Errorf("%s printed %q", verb, s)
		}
	}
	// The wire encoders take public types only: a vector, a public key, a manifest
	// and evaluation keys. None of their encodings contains the secret's coefficients.
	keysEnc, err := f.keys.Encode()
	if err != nil {
		t.Fatal(err)
	}
	pkWire, _ := MarshalPublicKey(f.client.PublicKey())
	vWire, _ := MarshalVector(f.enc(t, []float64{1}))
	secret := appendPoly(nil, sk.sk.Value.Q, ParamsN13().p.Q())[:64]
	for name, b := range map[string][]byte{"keys": keysEnc, "public key": mustMarshal(t, pkWire), "vector": mustMarshal(t, vWire)} {
		if strings.Contains(string(b), string(secret)) {
			t.Errorf("%s encoding contains secret-key coefficients", name)
		}
	}
}

func mustMarshal(t testing.TB, m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestVectorWire(t *testing.T) {
	f := mustFixture(t)
	p := ParamsN13()
	r := rand.New(rand.NewPCG(9, 10))
	want := randValues(r, p.Slots()+3)
	v := f.enc(t, want)
	wire, err := MarshalVector(v)
	if err != nil {
		t.Fatal(err)
	}
	seeded := proto.Size(wire)
	back, err := UnmarshalVector(p, wire)
	if err != nil {
		t.Fatal(err)
	}
	if e := maxErr(t, f.dec(t, back), want); e > 1e-7 {
		t.Errorf("seeded wire round trip error %g", e)
	}
	// A computed vector travels unseeded: about twice the size.
	sum, err := f.eval.Add(context.Background(), back, back)
	if err != nil {
		t.Fatal(err)
	}
	full, _ := MarshalVector(sum)
	if r := float64(proto.Size(full)) / float64(seeded); r < 1.95 || r > 2.05 {
		t.Errorf("unseeded/seeded size ratio %.3f", r)
	}
	back2, err := UnmarshalVector(p, full)
	if err != nil {
		t.Fatal(err)
	}
	for i := range want {
		want[i] *= 2
	}
	if e := maxErr(t, f.dec(t, back2), want); e > 1e-7 {
		t.Errorf("unseeded wire round trip error %g", e)
	}
}

func TestVectorValidation(t *testing.T) {
	f := mustFixture(t)
	p := ParamsN13()
	v := f.enc(t, []float64{0.5, -0.25})
	good, _ := MarshalVector(v)
	sum, _ := f.eval.Add(context.Background(), v, v)
	unseeded, _ := MarshalVector(sum)
	other, _ := NewParameters(Literal{LogN: 13, LogQ: []int{60, 40, 40}, LogP: []int{60}, LogDefaultScale: 39})
	cases := []struct {
		name   string
		base   *hev1.EncryptedVector
		mutate func(m *hev1.EncryptedVector)
		code   Kind
		text   string
	}{
		{"vector param ID", good, func(m *hev1.EncryptedVector) { m.ParamId = string(other.ID()) }, KindPrecondition, string(other.ID())},
		{"ciphertext param ID", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].ParamId = string(other.ID()) }, KindPrecondition, string(p.ID())},
		{"layout", good, func(m *hev1.EncryptedVector) { m.Layout = hev1.Layout_LAYOUT_UNSPECIFIED }, KindInvalid, "layout"},
		{"slots", good, func(m *hev1.EncryptedVector) { m.Slots = 8192 }, KindInvalid, "slots"},
		{"length zero", good, func(m *hev1.EncryptedVector) { m.Length = 0 }, KindInvalid, "length"},
		{"length too big", good, func(m *hev1.EncryptedVector) { m.Length = 1 << 27 }, KindInvalid, "length"},
		{"too many ciphertexts", good, func(m *hev1.EncryptedVector) { m.Length = 4096*4096 + 1 }, KindInvalid, "at most 4096"},
		{"count", good, func(m *hev1.EncryptedVector) { m.Length = 5000 }, KindInvalid, "needs 2 ciphertexts"},
		{"level", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].Level = 3 }, KindInvalid, "level 3"},
		{"scale NaN", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].Scale = math.NaN() }, KindInvalid, "scale"},
		{"scale huge", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].Scale = 0x1p200 }, KindInvalid, "scale"},
		{"scale below 1", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].Scale = 0.5 }, KindInvalid, "scale"},
		{"c0 short", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].C0 = m.Ciphertexts[0].C0[1:] }, KindInvalid, "c0"},
		{"level/size mismatch", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].Level = 1 }, KindInvalid, "c0"},
		{"seed short", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].Seed = m.Ciphertexts[0].Seed[:16] }, KindInvalid, "seed"},
		{"seed and c1", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].C1 = m.Ciphertexts[0].C0 }, KindInvalid, "both"},
		{"neither", good, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].Seed = nil }, KindInvalid, "c1"},
		{"c1 short", unseeded, func(m *hev1.EncryptedVector) { m.Ciphertexts[0].C1 = m.Ciphertexts[0].C1[8:] }, KindInvalid, "c1"},
		{"c0 unreduced", good, func(m *hev1.EncryptedVector) { setCoeff(m.Ciphertexts[0].C0, p.p.Q(), p.N(), 0, 10, p.p.Q()[0]) }, KindInvalid, "not reduced"},
		{"c0 unreduced last prime", good, func(m *hev1.EncryptedVector) {
			setCoeff(m.Ciphertexts[0].C0, p.p.Q(), p.N(), 2, 5, p.p.Q()[2]+1)
		}, KindInvalid, "prime 2"},
		{"c1 unreduced", unseeded, func(m *hev1.EncryptedVector) { setCoeff(m.Ciphertexts[0].C1, p.p.Q(), p.N(), 1, 0, p.p.Q()[1]) }, KindInvalid, "not reduced"},
	}
	for _, tc := range cases {
		m := proto.Clone(tc.base).(*hev1.EncryptedVector)
		tc.mutate(m)
		_, err := UnmarshalVector(p, m)
		if kindOf(err) != tc.code || !strings.Contains(err.Error(), tc.text) || !strings.HasPrefix(err.Error(), "he: ") {
			t.Errorf("%s: got %v (%v), want %v containing %q", tc.name, err, kindOf(err), tc.code, tc.text)
		}
	}
	if _, err := UnmarshalVector(p, good); err != nil {
		t.Fatalf("mutations leaked into the original: %v", err)
	}
}

// setCoeff overwrites coefficient j of limb `limb` in a packed polynomial with v,
// without reducing it.
func setCoeff(b []byte, moduli []uint64, n, limb, j int, v uint64) {
	off := polyBytes(moduli[:limb], n)
	w := bits.Len64(moduli[limb])
	for k := range w {
		pos := j*w + k
		mask := byte(1) << (pos & 7)
		if v>>k&1 == 1 {
			b[off+pos>>3] |= mask
		} else {
			b[off+pos>>3] &^= mask
		}
	}
}

func rlweScale(s float64) rlwe.Scale { return rlwe.NewScale(s) }

func TestMaxVectorWireSize(t *testing.T) {
	f := mustFixture(t)
	p := ParamsN13()
	for _, n := range []int{1, p.Slots(), p.Slots() + 1} {
		v := f.enc(t, make([]float64, n))
		s, err := f.eval.AddScalar(context.Background(), v, 1) // unseeded, max level
		if err != nil {
			t.Fatal(err)
		}
		m, _ := MarshalVector(s)
		size, bound := int64(proto.Size(m)), MaxVectorWireSize(p, n)
		if size > bound || float64(size) < 0.999*float64(bound) {
			t.Errorf("n=%d: wire size %d, bound %d", n, size, bound)
		}
	}
}
