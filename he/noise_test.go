package he

import (
	"math"
	"testing"

	"github.com/tuneinsight/lattigo/v5/ring/ringqp"
)

// TestGaussianNoise checks the sampler's distribution: bounded by 19, mean 0, standard
// deviation 3.2, and the probability of 0 (1/(sqrt(2 pi) sigma) = 0.1247).
func TestGaussianNoise(t *testing.T) {
	g, err := newGaussian()
	if err != nil {
		t.Fatal(err)
	}
	const n = 1 << 20
	e := make([]int64, n)
	g.fill(e)
	var sum, sq float64
	zeros, neg := 0, 0
	for _, v := range e {
		if v > noiseBound || v < -noiseBound {
			t.Fatalf("sample %d out of [-19, 19]", v)
		}
		sum += float64(v)
		sq += float64(v * v)
		if v == 0 {
			zeros++
		}
		if v < 0 {
			neg++
		}
	}
	mean, sd := sum/n, math.Sqrt(sq/n)
	p0 := float64(zeros) / n
	// 1M samples: the standard error of the mean is 0.003, of the deviation 0.0023.
	if math.Abs(mean) > 0.02 || math.Abs(sd-noiseSigma) > 0.02 || math.Abs(p0-0.1247) > 0.003 {
		t.Errorf("mean %.4f, standard deviation %.4f, P(0) %.4f", mean, sd, p0)
	}
	if frac := float64(neg) / float64(n-zeros); math.Abs(frac-0.5) > 0.005 {
		t.Errorf("negative fraction %.4f of non-zero samples", frac)
	}
}

// TestKeyRowNoise decrypts evaluation-key rows before the gadget term is added:
// b + a*s must be the sampled error, identical in every limb, with sigma about 3.2.
func TestKeyRowNoise(t *testing.T) {
	p := ParamsN13()
	c, err := NewClient(p)
	if err != nil {
		t.Fatal(err)
	}
	sk := c.sk.sk.Value
	ringQP := p.p.RingQP().AtLevel(p.p.MaxLevelQ(), p.p.MaxLevelP())
	g, _ := newGaussian()
	e := make([]int64, p.N())
	row := []ringqp.Poly{ringQP.NewPoly(), ringQP.NewPoly()}
	uniformFromSeed(p, []byte("row")).AtLevel(ringQP.LevelQ(), ringQP.LevelP()).Read(row[1])
	encryptZeroRow(ringQP, p.p.Q(), p.p.P(), sk, row, g, e)
	dec := ringQP.NewPoly()
	ringQP.MulCoeffsMontgomeryThenAdd(row[1], sk, row[0]) // row[0] = MForm(NTT(e))
	ringQP.IMForm(row[0], dec)
	ringQP.INTT(dec, dec)
	var sq float64
	limbs := append(append([][]uint64{}, dec.Q.Coeffs...), dec.P.Coeffs...)
	moduli := append(append([]uint64{}, p.p.Q()...), p.p.P()...)
	for j := range p.N() {
		for i, limb := range limbs {
			v := int64(limb[j])
			if limb[j] > moduli[i]/2 {
				v = -int64(moduli[i] - limb[j])
			}
			if v != e[j] {
				t.Fatalf("coefficient %d limb %d: %d, sampled %d", j, i, v, e[j])
			}
		}
		sq += float64(e[j] * e[j])
	}
	if sd := math.Sqrt(sq / float64(p.N())); sd < 2.9 || sd > 3.5 {
		t.Errorf("row noise standard deviation %.3f", sd)
	}
}
