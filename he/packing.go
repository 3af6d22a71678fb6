package he

import (
	"math/bits"

	"github.com/tuneinsight/lattigo/v5/ring"
)

// Polynomials travel limb by limb: limb i holds the N coefficients modulo q_i, each in
// bitlen(q_i) bits, least significant bit first, so a 40-bit prime costs 5 bytes per
// coefficient instead of 8 (N is a multiple of 8, so every limb ends on a byte).

// limbBytes returns the packed size of one limb of n coefficients modulo q.
func limbBytes(q uint64, n int) int { return bits.Len64(q) * n / 8 }

// polyBytes returns the packed size of a polynomial of n coefficients over moduli.
func polyBytes(moduli []uint64, n int) int {
	s := 0
	for _, q := range moduli {
		s += limbBytes(q, n)
	}
	return s
}

// appendPoly appends the limbs of p packed, each coefficient reduced modulo its prime.
func appendPoly(out []byte, p ring.Poly, moduli []uint64) []byte {
	for i, row := range p.Coeffs {
		q := moduli[i]
		w := uint(bits.Len64(q))
		start := len(out)
		out = append(out, make([]byte, limbBytes(q, len(row)))...)
		limb := out[start:]
		var pos uint // bit position in limb
		for _, c := range row {
			c %= q
			for got := uint(0); got < w; {
				byteIdx, off := pos>>3, pos&7
				take := min(8-off, w-got)
				limb[byteIdx] |= byte((c>>got)&(1<<take-1)) << off
				got += take
				pos += take
			}
		}
	}
	return out
}

// readPoly fills p's limbs from packed bytes, refusing any coefficient not reduced
// modulo its prime, and returns the bytes that follow.
func readPoly(b []byte, p ring.Poly, moduli []uint64) ([]byte, error) {
	for i, row := range p.Coeffs {
		q := moduli[i]
		w := uint(bits.Len64(q))
		size := limbBytes(q, len(row))
		if len(b) < size {
			return nil, invalidf("polynomial truncated")
		}
		limb := b[:size]
		var pos uint // bit position in limb
		for j := range row {
			var c uint64
			for got := uint(0); got < w; {
				byteIdx, off := pos>>3, pos&7
				take := min(8-off, w-got)
				c |= (uint64(limb[byteIdx]>>off) & (1<<take - 1)) << got
				got += take
				pos += take
			}
			if c >= q {
				return nil, invalidf("coefficient %d of prime %d not reduced", j, i)
			}
			row[j] = c
		}
		b = b[size:]
	}
	return b, nil
}
