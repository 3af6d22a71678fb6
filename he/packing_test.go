package he

import (
	"bytes"
	"math/bits"
	"math/rand/v2"
	"slices"
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

// packRef is the packing written out bit by bit: the reference appendPoly's
// word-at-a-time accumulator must match byte for byte.
func packRef(p ring.Poly, moduli []uint64) []byte {
	var out []byte
	for i, row := range p.Coeffs {
		q := moduli[i]
		w := bits.Len64(q)
		limb := make([]byte, limbBytes(q, len(row)))
		pos := 0
		for _, c := range row {
			c %= q
			for b := range w {
				limb[pos/8] |= byte(c>>b&1) << (pos % 8)
				pos++
			}
		}
		out = append(out, limb...)
	}
	return out
}

// TestPackingMatchesReference checks appendPoly against packRef for every bit width
// from 2 to 61 and lengths that end a limb on every byte offset of a word.
func TestPackingMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for w := 2; w <= 61; w++ {
		q := uint64(1)<<(w-1) + r.Uint64N(uint64(1)<<(w-1)-1) // below 2^w - 1
		for _, n := range []int{8, 16, 24, 40, 64, 72, 1024} {
			moduli := []uint64{q, q - 1}
			p := ring.Poly{Coeffs: [][]uint64{make([]uint64, n), make([]uint64, n)}}
			for i := range p.Coeffs {
				for j := range n {
					p.Coeffs[i][j] = r.Uint64N(moduli[i])
				}
			}
			p.Coeffs[0][n-1] = q - 1
			got, want := appendPoly(nil, p, moduli), packRef(p, moduli)
			if !bytes.Equal(got, want) {
				t.Fatalf("w=%d n=%d: packing differs from the reference", w, n)
			}
			back := ring.Poly{Coeffs: [][]uint64{make([]uint64, n), make([]uint64, n)}}
			if rest, err := readPoly(got, back, moduli); err != nil || len(rest) != 0 {
				t.Fatalf("w=%d n=%d: %v", w, n, err)
			}
			for i := range p.Coeffs {
				if !slices.Equal(back.Coeffs[i], p.Coeffs[i]) {
					t.Fatalf("w=%d n=%d: limb %d does not round-trip", w, n, i)
				}
			}
			// q itself, the smallest unreduced word, is refused at the end of a limb.
			bad := ring.Poly{Coeffs: [][]uint64{slices.Clone(p.Coeffs[0])}}
			bad.Coeffs[0][n-1] = q
			enc := packRef(bad, []uint64{uint64(1)<<w - 1}) // same width as q, q not reduced
			if _, err := readPoly(enc, ring.Poly{Coeffs: back.Coeffs[:1]}, []uint64{q}); err == nil {
				t.Fatalf("w=%d n=%d: unreduced coefficient accepted", w, n)
			}
		}
	}
}

// unpackRef is readPoly written out bit by bit, for one limb of n coefficients of width w.
func unpackRef(limb []byte, w, n int) []uint64 {
	out := make([]uint64, n)
	pos := 0
	for j := range out {
		for b := range w {
			out[j] |= uint64(limb[pos/8]>>(pos%8)&1) << b
			pos++
		}
	}
	return out
}

// FuzzReadPoly checks readPoly on untrusted bytes against the bit-by-bit reference, for
// two limbs of any widths from 2 to 61 bits: it never panics, refuses a truncated input and
// every coefficient at or above its prime, and otherwise decodes what the reference reads,
// returns the rest untouched and accepts only the one encoding appendPoly writes.
func FuzzReadPoly(f *testing.F) {
	f.Add(uint16(0x3b3b), uint8(3), uint64(0), uint64(0), bytes.Repeat([]byte{0xff}, 200))
	f.Add(uint16(0x0000), uint8(0), uint64(1), uint64(1), []byte{0x55, 0xaa, 0x12})
	f.Add(uint16(0x2610), uint8(7), uint64(12345), uint64(6789), bytes.Repeat([]byte{0x01, 0x80}, 300))
	f.Fuzz(func(t *testing.T, widths uint16, nSel uint8, q1Low, q2Low uint64, data []byte) {
		n := 8 * (1 + int(nSel%32))
		var moduli []uint64
		for _, wSel := range []uint8{uint8(widths), uint8(widths >> 8)} {
			w := 2 + uint(wSel%60) // 2..61
			low := q1Low
			if len(moduli) == 1 {
				low = q2Low
			}
			moduli = append(moduli, uint64(1)<<(w-1)|low&(uint64(1)<<(w-1)-1))
		}
		p := ring.Poly{Coeffs: [][]uint64{make([]uint64, n), make([]uint64, n)}}
		rest, err := readPoly(data, p, moduli)

		size := polyBytes(moduli, n)
		if len(data) < size {
			if err == nil {
				t.Fatalf("%d bytes for %d: truncated polynomial accepted", len(data), size)
			}
			return
		}
		var want [][]uint64
		reduced := true
		off := 0
		for _, q := range moduli {
			w := bits.Len64(q)
			row := unpackRef(data[off:off+limbBytes(q, n)], w, n)
			off += limbBytes(q, n)
			for _, c := range row {
				reduced = reduced && c < q
			}
			want = append(want, row)
		}
		if !reduced {
			if err == nil {
				t.Fatal("unreduced coefficient accepted")
			}
			return
		}
		if err != nil {
			t.Fatalf("valid polynomial refused: %v", err)
		}
		for i := range moduli {
			if !slices.Equal(p.Coeffs[i], want[i]) {
				t.Fatalf("limb %d decodes other than the reference", i)
			}
		}
		if !bytes.Equal(rest, data[size:]) {
			t.Fatal("rest differs")
		}
		if !bytes.Equal(appendPoly(nil, p, moduli), data[:size]) {
			t.Fatal("accepted an encoding appendPoly does not write")
		}
	})
}
