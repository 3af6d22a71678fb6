package he

import (
	"math"
)

// Noise bounds. A Vector carries a bound E on the magnitude of every coefficient of
// its decryption error (in the plaintext ring, where a value x is x * scale): tracked
// through the operations that keep it computable (encryption, additions, plaintext
// and scalar products), unknown (0) otherwise and for vectors received over the wire,
// whose bound is the sender's claim. Each random term is bounded by noiseTail
// standard deviations (the chance that one coefficient exceeds it is below 2^-48);
// sums of terms add their bounds (the worst case). See docs/he.md.
const noiseTail = 8

// freshNoise returns the bound of a fresh encryption: under the secret key the
// error e (sigma 3.2) and the encoding's rounding; under a public key
// u*e_pk + e0 + e1*s with ternary u and s (density 2/3), variance
// sigma^2 * (4N/3 + 1), and the rounding.
func freshNoise(p *Parameters, public bool) float64 {
	if !public {
		return noiseTail*noiseSigma + 0.5
	}
	return noiseTail*noiseSigma*math.Sqrt(4*float64(p.N())/3+1) + 0.5
}

// rescaleNoise returns the bound of the rounding a rescale adds: r0 + r1*s with r
// uniform in [-1/2, 1/2], variance (1 + 2N/3) / 12.
func rescaleNoise(p *Parameters) float64 {
	return noiseTail * math.Sqrt((1+2*float64(p.N())/3)/12)
}

// FreshNoiseBound returns the noise bound of a fresh public-key encryption under p
// (what data owners send), for WithNoiseBound.
func FreshNoiseBound(p *Parameters) float64 { return freshNoise(p, true) }

// SumNoiseBound returns the noise bound of the sum of n vectors of bound each.
func SumNoiseBound(each float64, n int) float64 { return each * float64(n) }

// ScaledNoiseBound returns the noise bound after MulScalar by a non-integer c (or
// MulPlain by values of magnitude at most |c|): the input's bound times |c|, plus
// the rescale's rounding.
func ScaledNoiseBound(p *Parameters, bound, c float64) float64 {
	return bound*math.Abs(c) + rescaleNoise(p)
}

// NoiseBound returns v's noise bound, or 0 when it is unknown (after a ciphertext
// product, a rotation, a polynomial, or decoding from the wire).
func (v *Vector) NoiseBound() float64 { return v.noise }

// FloodingSigma returns the standard deviation of the flooding noise that Li,
// Micciancio, Schultz and Sorrell (CRYPTO 2022, "Securing approximate homomorphic
// encryption using differential privacy") show sufficient for securityBits of
// statistical security against an adversary who sees up to queries decryptions of
// ciphertexts whose noise is bounded by noiseBound:
// sigma = sqrt(64 * queries) * 2^(securityBits/2) * noiseBound.
func FloodingSigma(noiseBound float64, securityBits, queries int) float64 {
	return math.Sqrt(64*float64(queries)) * math.Exp2(float64(securityBits)/2) * noiseBound
}

// WithFlooding makes Decrypt add a discrete Gaussian of standard deviation
// FloodingSigma(bound, securityBits, queries) to the decrypted polynomial, where bound
// is the vector's noise bound (or the one WithNoiseBound declares): the
// countermeasure to the Li-Micciancio key-recovery attack, for a decryption released
// to a party that chose the computation or its inputs. securityBits lies in [16, 128]
// and queries in [1, 2^32]; Decrypt refuses when the bound is unknown or when the
// flooding does not fit the ciphertext's remaining modulus. Each value's error grows
// by about sigma * sqrt(N) / scale (docs/he.md has the figures per preset).
func WithFlooding(securityBits, queries int) DecryptOption {
	return decryptOptionFunc(func(c *decryptConfig) { c.floodSec, c.floodQueries = securityBits, queries })
}

// WithNoiseBound declares the noise bound of the vector to decrypt, for vectors
// received over the wire (whose bound Decrypt cannot know): for example
// ScaledNoiseBound(p, SumNoiseBound(FreshNoiseBound(p), n), 1/count) for a mean of n
// public-key submissions. It overrides the vector's own bound.
func WithNoiseBound(bound float64) DecryptOption {
	return decryptOptionFunc(func(c *decryptConfig) { c.noiseBound = bound })
}

// floodingSigma returns the flooding standard deviation cfg asks for on v (0: no
// flooding).
func (cfg *decryptConfig) floodingSigma(v *Vector) (float64, error) {
	if cfg.floodSec == 0 && cfg.floodQueries == 0 {
		return 0, nil
	}
	if cfg.floodSec < 16 || cfg.floodSec > 128 || cfg.floodQueries < 1 || cfg.floodQueries > 1<<32 {
		return 0, invalidf("flooding for %d bits and %d queries out of range ([16, 128] bits, [1, 2^32] queries)", cfg.floodSec, cfg.floodQueries)
	}
	bound := v.noise
	if cfg.noiseBound != 0 {
		bound = cfg.noiseBound
	}
	if !(bound > 0) || math.IsInf(bound, 0) {
		return 0, invalidf("flooding needs the vector's noise bound: declare it with WithNoiseBound")
	}
	return FloodingSigma(bound, cfg.floodSec, cfg.floodQueries), nil
}
