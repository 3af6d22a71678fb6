package he

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"
	"sync"

	"github.com/tuneinsight/lattigo/v5/ring"
	"github.com/tuneinsight/lattigo/v5/schemes/ckks"
)

// ParamID identifies a parameter set: the first 16 bytes of a SHA-256 over the
// canonical parameters (ring degree, the actual primes of Q and P, the default scale
// and the secret and error distributions), written as 32 lowercase hex digits. It
// travels in every ciphertext and key message; a mismatch is failed_precondition.
type ParamID string

// Literal is a user-specified CKKS parameter set. The zero value is not usable.
type Literal struct {
	// LogN is log2 of the ring degree N; a ciphertext holds N/2 slots.
	LogN int
	// LogQ lists the bit sizes of the ciphertext primes q_0..q_L. The first is the
	// base prime (it bounds the values a level-0 ciphertext can hold); the others
	// are consumed one per rescaling and should match LogDefaultScale.
	LogQ []int
	// LogP lists the bit sizes of the key-switching primes. Their sum must be at least
	// that of every group of len(LogP) consecutive Q primes.
	LogP []int
	// LogDefaultScale is log2 of the encoding scale.
	LogDefaultScale int
	// InsecureForTests allows log2(QP) above the 128-bit HE-standard bound for N.
	// Never set it outside tests.
	InsecureForTests bool
}

// Parameters is a checked, immutable CKKS parameter set. Use a preset (ParamsN13,
// ParamsN14, ParamsN15) or NewParameters.
type Parameters struct {
	p        ckks.Parameters
	lit      Literal
	id       ParamID
	insecure bool
}

// maxLogQP128 is the 128-bit classical security bound on log2(QP) for a uniform
// ternary secret, from the HomomorphicEncryption.org standard (Albrecht et al. 2018).
var maxLogQP128 = map[int]int{10: 27, 11: 54, 12: 109, 13: 218, 14: 438, 15: 881, 16: 1761}

// MaxLogQP returns the 128-bit HE-standard bound on log2(QP) for ring degree 2^logN,
// and false when the standard gives none.
func MaxLogQP(logN int) (int, bool) {
	b, ok := maxLogQP128[logN]
	return b, ok
}

// NewParameters checks lit and builds the parameter set. A set whose log2(QP) exceeds
// the 128-bit bound is refused unless lit.InsecureForTests is set.
func NewParameters(lit Literal) (params *Parameters, err error) {
	defer recoverInto(&err, "new parameters")
	if lit.LogN < 10 || lit.LogN > 16 {
		return nil, invalidf("LogN %d out of range [10, 16]", lit.LogN)
	}
	if len(lit.LogQ) == 0 || len(lit.LogQ) > 60 || len(lit.LogP) == 0 || len(lit.LogP) > 8 {
		return nil, invalidf("need 1..60 Q primes and 1..8 P primes, have %d and %d", len(lit.LogQ), len(lit.LogP))
	}
	for _, b := range append(append([]int(nil), lit.LogQ...), lit.LogP...) {
		if b < 20 || b > 61 {
			return nil, invalidf("prime size %d bits out of range [20, 61]", b)
		}
	}
	// Key switching decomposes Q into groups of len(LogP) consecutive primes; its
	// noise is about (group / P) times the ciphertext's, so P must cover every group.
	logP, maxGroup := 0, 0
	for _, b := range lit.LogP {
		logP += b
	}
	for i := 0; i < len(lit.LogQ); i += len(lit.LogP) {
		g := 0
		for _, b := range lit.LogQ[i:min(i+len(lit.LogP), len(lit.LogQ))] {
			g += b
		}
		maxGroup = max(maxGroup, g)
	}
	if logP < maxGroup {
		return nil, invalidf("P has %d bits, less than a key-switching group of Q primes (%d bits)", logP, maxGroup)
	}
	if lit.LogDefaultScale < 10 || lit.LogDefaultScale >= lit.LogQ[0] {
		return nil, invalidf("log scale %d must be in [10, log q_0 = %d)", lit.LogDefaultScale, lit.LogQ[0])
	}
	p, err := ckks.NewParametersFromLiteral(ckks.ParametersLiteral{
		LogN:            lit.LogN,
		LogQ:            lit.LogQ,
		LogP:            lit.LogP,
		Xs:              ring.Ternary{P: 2 / 3.0},
		Xe:              ring.DiscreteGaussian{Sigma: 3.2, Bound: 19},
		LogDefaultScale: lit.LogDefaultScale,
	})
	if err != nil {
		return nil, invalidf("parameters: %v", err)
	}
	bound, _ := MaxLogQP(lit.LogN)
	if p.LogQP() > float64(bound) && !lit.InsecureForTests {
		return nil, invalidf("log2(QP) = %.1f exceeds the 128-bit bound %d for N = 2^%d", p.LogQP(), bound, lit.LogN)
	}
	lit.LogQ = append([]int(nil), lit.LogQ...)
	lit.LogP = append([]int(nil), lit.LogP...)
	return &Parameters{p: p, lit: lit, id: paramID(p), insecure: p.LogQP() > float64(bound)}, nil
}

func paramID(p ckks.Parameters) ParamID {
	h := sha256.New()
	h.Write([]byte("veil-he-params-v1\x00ckks"))
	var b [8]byte
	put := func(v uint64) { binary.BigEndian.PutUint64(b[:], v); h.Write(b[:]) }
	put(uint64(p.LogN()))
	put(uint64(p.LogDefaultScale()))
	put(uint64(len(p.Q())))
	for _, q := range p.Q() {
		put(q)
	}
	put(uint64(len(p.P())))
	for _, q := range p.P() {
		put(q)
	}
	fmt.Fprintf(h, "xs=%v;xe=%v", p.Xs(), p.Xe())
	sum := h.Sum(nil)
	return ParamID(hex.EncodeToString(sum[:16]))
}

// ID returns the parameter ID.
func (p *Parameters) ID() ParamID { return p.id }

// Literal returns a copy of the literal the set was built from.
func (p *Parameters) Literal() Literal {
	l := p.lit
	l.LogQ = append([]int(nil), p.lit.LogQ...)
	l.LogP = append([]int(nil), p.lit.LogP...)
	return l
}

// LogN returns log2 of the ring degree.
func (p *Parameters) LogN() int { return p.p.LogN() }

// N returns the ring degree.
func (p *Parameters) N() int { return p.p.N() }

// Slots returns the number of float64 values one ciphertext holds (N/2).
func (p *Parameters) Slots() int { return p.p.MaxSlots() }

// MaxLevel returns the level of a fresh ciphertext: the number of multiplications
// (rescalings) it supports.
func (p *Parameters) MaxLevel() int { return p.p.MaxLevel() }

// LogQP returns log2 of the product of all primes.
func (p *Parameters) LogQP() float64 { return p.p.LogQP() }

// Insecure reports whether the set exceeds the 128-bit bound (only possible with
// Literal.InsecureForTests).
func (p *Parameters) Insecure() bool { return p.insecure }

// DefaultScale returns the encoding scale.
func (p *Parameters) DefaultScale() float64 { return math.Exp2(float64(p.p.LogDefaultScale())) }

// LevelZeroMaxAbs returns the largest magnitude a value at the default scale may have
// for a ciphertext to be decrypted at level 0: q_0 / (2 * scale) / 16 (a 16x margin for
// noise and the scale drift of rescaling).
func (p *Parameters) LevelZeroMaxAbs() float64 {
	return float64(p.p.Q()[0]) / (2 * p.DefaultScale()) / 16
}

// String describes the set.
func (p *Parameters) String() string {
	return fmt.Sprintf("CKKS N=2^%d logQ=%v logP=%v scale=2^%d logQP=%.1f id=%s",
		p.lit.LogN, p.lit.LogQ, p.lit.LogP, p.lit.LogDefaultScale, p.LogQP(), p.id)
}

func mustPreset(lit Literal) func() *Parameters {
	return sync.OnceValue(func() *Parameters {
		p, err := NewParameters(lit)
		if err != nil {
			// Presets are constants checked by TestPresets; this cannot happen at run time.
			panic(err)
		}
		return p
	})
}

var (
	presetN13 = mustPreset(Literal{LogN: 13, LogQ: []int{60, 40, 40}, LogP: []int{60}, LogDefaultScale: 40})
	presetN14 = mustPreset(Literal{LogN: 14, LogQ: []int{60, 45, 45, 45, 45, 45, 45}, LogP: []int{61}, LogDefaultScale: 45})
	presetN15 = mustPreset(Literal{LogN: 15, LogQ: []int{60, 45, 45, 45, 45, 45, 45, 45, 45, 45, 45, 45, 45, 45, 45}, LogP: []int{61, 61}, LogDefaultScale: 45})
)

// ParamsN13 returns the N=8192 preset: LogQ [60,40,40], LogP [60], scale 2^40.
// 4096 slots, depth 2, log2(QP) about 200 (bound 218). A ciphertext travels as 289 KB
// (144 KB seeded when fresh); one evaluation key as 0.62 MB (1.57 MB in memory).
func ParamsN13() *Parameters { return presetN13() }

// ParamsN14 returns the N=16384 preset: LogQ [60, 45 x 6], LogP [61], scale 2^45.
// 8192 slots, depth 6, log2(QP) about 391 (bound 438). A ciphertext travels as 1.36 MB
// (682 KB seeded); one evaluation key as 5.6 MB (14.7 MB in memory).
func ParamsN14() *Parameters { return presetN14() }

// ParamsN15 returns the N=32768 preset: LogQ [60, 45 x 14], LogP [61, 61], scale 2^45.
// 16384 slots, depth 14, log2(QP) about 812 (bound 881). A ciphertext travels as
// 5.7 MB (2.9 MB seeded); one evaluation key as 26.9 MB (71 MB in memory).
func ParamsN15() *Parameters { return presetN15() }

// Presets returns every preset, smallest first.
func Presets() []*Parameters { return []*Parameters{ParamsN13(), ParamsN14(), ParamsN15()} }
