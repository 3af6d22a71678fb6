package he

import (
	"math/rand/v2"
	"testing"

	"github.com/tuneinsight/lattigo/v5/ring"
)

// TestPacking round-trips random polynomials (including 0 and q-1 in every limb)
// through the packed encoding for every preset's moduli, and checks sizes and
// truncation.
func TestPacking(t *testing.T) {
	r := rand.New(rand.NewPCG(31, 32))
	for _, p := range Presets() {
		moduli := append(append([]uint64{}, p.p.Q()...), p.p.P()...)
		const n = 1024
		src := ring.Poly{Coeffs: make([][]uint64, len(moduli))}
		dst := ring.Poly{Coeffs: make([][]uint64, len(moduli))}
		for i, q := range moduli {
			src.Coeffs[i] = make([]uint64, n)
			dst.Coeffs[i] = make([]uint64, n)
			for j := range n {
				src.Coeffs[i][j] = r.Uint64N(q)
			}
			src.Coeffs[i][0], src.Coeffs[i][n-1] = 0, q-1
		}
		b := appendPoly([]byte{0xaa}, src, moduli)[1:]
		if len(b) != polyBytes(moduli, n) {
			t.Fatalf("%v: %d bytes, want %d", p, len(b), polyBytes(moduli, n))
		}
		rest, err := readPoly(append(b, 0xbb), dst, moduli)
		if err != nil || len(rest) != 1 || rest[0] != 0xbb {
			t.Fatalf("%v: %v, rest %x", p, err, rest)
		}
		for i := range moduli {
			for j := range n {
				if dst.Coeffs[i][j] != src.Coeffs[i][j] {
					t.Fatalf("%v: limb %d coefficient %d: %d, want %d", p, i, j, dst.Coeffs[i][j], src.Coeffs[i][j])
				}
			}
		}
		if _, err := readPoly(b[:len(b)-1], dst, moduli); err == nil {
			t.Errorf("%v: truncated polynomial accepted", p)
		}
		// Unreduced input words are reduced on the way out.
		src.Coeffs[0][3] = moduli[0] + 5
		back := appendPoly(nil, src, moduli)
		if _, err := readPoly(back, dst, moduli); err != nil || dst.Coeffs[0][3] != 5 {
			t.Errorf("%v: unreduced word encoded as %d (%v)", p, dst.Coeffs[0][3], err)
		}
	}
}
