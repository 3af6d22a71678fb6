package he

import (
	"encoding/binary"
	"math/bits"
	"slices"

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
// Coefficients go through a 64-bit accumulator written out eight bytes at a time
// (bit-by-bit packing cost about 15 ns per coefficient, a tenth of a ciphertext's
// encryption).
func appendPoly(out []byte, p ring.Poly, moduli []uint64) []byte {
	for i, row := range p.Coeffs {
		q := moduli[i]
		w := uint(bits.Len64(q))
		start := len(out)
		out = slices.Grow(out, limbBytes(q, len(row)))[:start+limbBytes(q, len(row))]
		limb := out[start:]
		var acc uint64 // pending bits, least significant first
		var n uint     // how many
		k := 0
		for _, c := range row {
			if c >= q {
				c %= q
			}
			acc |= c << n
			if n+w < 64 {
				n += w
				continue
			}
			binary.LittleEndian.PutUint64(limb[k:], acc)
			k += 8
			acc = c >> (64 - n) // n > 0 here since w < 64; the bits of c that did not fit
			n = n + w - 64
		}
		for ; n > 0; n -= 8 { // N is a multiple of 8: the limb ends on a byte
			limb[k] = byte(acc)
			acc >>= 8
			k++
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
		mask := uint64(1)<<w - 1
		size := limbBytes(q, len(row))
		if len(b) < size {
			return nil, invalidf("polynomial truncated")
		}
		limb := b[:size]
		var acc uint64 // unread bits, least significant first
		var n uint     // how many
		k := 0
		for j := range row {
			c := acc
			if n < w {
				var next uint64
				got := uint(64)
				if k+8 <= len(limb) {
					next = binary.LittleEndian.Uint64(limb[k:])
					k += 8
				} else {
					got = uint(8 * (len(limb) - k))
					for s := uint(0); k < len(limb); s += 8 {
						next |= uint64(limb[k]) << s
						k++
					}
				}
				c |= next << n
				acc = next >> (w - n) // w - n in [1, 63]
				n = n + got - w
			} else {
				acc >>= w
				n -= w
			}
			c &= mask
			if c >= q {
				return nil, invalidf("coefficient %d of prime %d not reduced", j, i)
			}
			row[j] = c
		}
		b = b[size:]
	}
	return b, nil
}
