package he

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"math"
	"math/bits"
	"sync"

	"github.com/tuneinsight/lattigo/v5/ring"
	"github.com/tuneinsight/lattigo/v5/ring/ringqp"
)

// Key-generation error distribution: a discrete Gaussian of standard deviation 3.2 cut
// at 19 (6 sigma), the parameters' Xe.
const (
	noiseSigma = 3.2
	noiseBound = 19
)

// noiseCDT is the cumulative distribution of |x| scaled to 2^64: P(|x| <= k) * 2^64,
// with P(|x| = k) proportional to exp(-k^2 / (2 sigma^2)), doubled for k > 0.
var noiseCDT = sync.OnceValue(func() [noiseBound + 1]uint64 {
	var w [noiseBound + 1]float64
	total := 0.0
	for k := range w {
		w[k] = math.Exp(-float64(k*k) / (2 * noiseSigma * noiseSigma))
		if k > 0 {
			w[k] *= 2
		}
		total += w[k]
	}
	var cdt [noiseBound + 1]uint64
	acc := 0.0
	for k := range noiseBound {
		acc += w[k]
		cdt[k] = uint64(math.Ldexp(acc/total, 64))
	}
	cdt[noiseBound] = math.MaxUint64
	return cdt
})

// gaussian draws the error of evaluation-key rows by inverting noiseCDT with a random
// sign. Its randomness is AES-256-CTR under a fresh key from crypto/rand, much faster
// than lattigo's blake2b-fed floating-point sampler, and secret (unlike the seeded
// uniform part of the rows). Not safe for concurrent use.
type gaussian struct {
	s   cipher.Stream
	buf []byte
}

func newGaussian() (*gaussian, error) {
	var key [32]byte
	if _, err := rand.Read(key[:]); err != nil {
		return nil, internalf("reading randomness")
	}
	block, err := aes.NewCipher(key[:])
	if err != nil {
		return nil, internalf("noise cipher")
	}
	return &gaussian{s: cipher.NewCTR(block, make([]byte, aes.BlockSize))}, nil
}

// fill writes len(out) samples; the table scan has no data-dependent branch.
func (g *gaussian) fill(out []int64) {
	n := len(out)
	if cap(g.buf) < 9*n {
		g.buf = make([]byte, 9*n)
	}
	b := g.buf[:9*n]
	clear(b)
	g.s.XORKeyStream(b, b)
	cdt := noiseCDT()
	signs := b[8*n:]
	for i := range out {
		r := binary.LittleEndian.Uint64(b[8*i:])
		var k uint64
		for j := range noiseBound {
			_, borrow := bits.Sub64(r, cdt[j], 0) // borrow is 1 when r < cdt[j]
			k += 1 - borrow
		}
		s := int64(signs[i>>3]>>(i&7)) & 1
		out[i] = (int64(k) ^ -s) + s // k, or -k when s is 1
	}
}

// setSmall writes the small integers e into every limb of p (coefficient domain),
// without branching on the (secret) signs.
func setSmall(p ring.Poly, e []int64, moduli []uint64) {
	for i, row := range p.Coeffs {
		q := moduli[i]
		for j, v := range e {
			row[j] = uint64(v) + q&uint64(v>>63) // v, or q + v when v < 0
		}
	}
}

// encryptZeroRow turns a row whose uniform part row[1] is already sampled into an
// encryption of zero under sk in QP (NTT and Montgomery domain), as lattigo's
// key generator does: row[0] = MForm(NTT(e)) - row[1]*sk.
func encryptZeroRow(ringQP ringqp.Ring, moduliQ, moduliP []uint64, sk ringqp.Poly, row []ringqp.Poly, g *gaussian, e []int64) {
	c0, c1 := row[0], row[1]
	g.fill(e)
	setSmall(c0.Q, e, moduliQ)
	setSmall(c0.P, e, moduliP)
	ringQP.NTT(c0, c0)
	ringQP.MForm(c0, c0)
	ringQP.MulCoeffsMontgomeryThenSub(c1, sk, c0)
}
