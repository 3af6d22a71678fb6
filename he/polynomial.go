package he

import (
	"context"
	"math"
	"math/big"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/he/hefloat"
	"github.com/tuneinsight/lattigo/v5/utils/bignum"
)

// Polynomial is a real polynomial the Evaluator applies slot-wise: a Chebyshev
// approximation of a function on an interval, or a polynomial given by monomial
// coefficients. It is immutable and safe to share.
type Polynomial struct {
	poly      bignum.Polynomial
	chebyshev bool
	a, b      float64
}

// maxPolynomialDegree bounds the degree the Evaluator accepts.
const maxPolynomialDegree = 255

// ChebyshevApproximation interpolates f at the degree+1 Chebyshev nodes of [a, b].
// Inputs outside [a, b] give meaningless results. Evaluation costs
// ceil(log2(degree+1)) levels, plus one for the change of basis when [a, b] is not
// [-1, 1].
func ChebyshevApproximation(f func(float64) float64, a, b float64, degree int) (*Polynomial, error) {
	if f == nil || !(a < b) || math.IsInf(a, 0) || math.IsInf(b, 0) {
		return nil, invalidf("chebyshev: need a function and a finite interval a < b")
	}
	if degree < 1 || degree > maxPolynomialDegree {
		return nil, invalidf("chebyshev: degree %d out of range [1, %d]", degree, maxPolynomialDegree)
	}
	const prec = 128
	p := bignum.ChebyshevApproximation(f, bignum.Interval{Nodes: degree, A: *bignum.NewFloat(a, prec), B: *bignum.NewFloat(b, prec)})
	return &Polynomial{poly: p, chebyshev: true, a: a, b: b}, nil
}

// Sigmoid is the logistic function 1/(1+e^-x).
func Sigmoid(x float64) float64 { return 1 / (1 + math.Exp(-x)) }

// SigmoidApproximation returns the Chebyshev approximation of the sigmoid on
// [-bound, bound] for logistic-regression scoring. Measured maximum errors on the
// interval (TestSigmoidApproximationError, docs/he.md): bound 8: degree 3 about 0.11,
// degree 7 about 0.031, degree 15 about 0.0031; bound 4: degree 7 about 0.0017.
// Depth: ceil(log2(degree+1)) + 1 levels.
func SigmoidApproximation(bound float64, degree int) (*Polynomial, error) {
	if !(bound > 0) {
		return nil, invalidf("sigmoid: bound must be positive")
	}
	return ChebyshevApproximation(Sigmoid, -bound, bound, degree)
}

// NewPolynomial returns sum_i coeffs[i] * x^i. It costs ceil(log2(degree+1)) levels;
// keep inputs small (|x| <= 1 is safe) so that the powers stay within the scale.
func NewPolynomial(coeffs []float64) (*Polynomial, error) {
	if len(coeffs) < 2 || len(coeffs) > maxPolynomialDegree+1 {
		return nil, invalidf("polynomial: need 2..%d coefficients", maxPolynomialDegree+1)
	}
	for _, c := range coeffs {
		if math.IsNaN(c) || math.IsInf(c, 0) {
			return nil, invalidf("polynomial: coefficient not finite")
		}
	}
	return &Polynomial{poly: bignum.NewPolynomial(bignum.Monomial, coeffs, nil)}, nil
}

// Degree returns the polynomial's degree.
func (p *Polynomial) Degree() int { return p.poly.Degree() }

// Depth returns the levels evaluation consumes.
func (p *Polynomial) Depth() int {
	d := p.poly.Depth()
	if p.changesBasis() {
		d++
	}
	return d
}

func (p *Polynomial) changesBasis() bool {
	return p.chebyshev && (p.a != -1 || p.b != 1)
}

// Evaluate computes the polynomial at x in the clear: what the Evaluator computes
// homomorphically, less the CKKS noise.
func (p *Polynomial) Evaluate(x float64) float64 {
	pp := p.poly.Clone()
	y, _ := pp.Evaluate(x)[0].Float64()
	return y
}

// EvalPolynomial applies p to every value of a. It needs the relinearization key and
// p.Depth() levels. Slots past a.Len() then hold p(0): later sums mask them.
func (e *Evaluator) EvalPolynomial(ctx context.Context, a *Vector, p *Polynomial) (out *Vector, err error) {
	if err := e.check("polynomial", a); err != nil {
		return nil, err
	}
	if p == nil {
		return nil, invalidf("polynomial: nil polynomial")
	}
	if err := needLevels("polynomial", p.Depth(), a); err != nil {
		return nil, err
	}
	if err := e.needRelin("polynomial"); err != nil {
		return nil, err
	}
	err = e.do(ctx, "polynomial", func(w *evalWorker) error {
		hp := hefloat.Parameters{Parameters: e.params.p}
		pe := hefloat.NewPolynomialEvaluator(hp, w.eval)
		cts := make([]*rlwe.Ciphertext, len(a.cts))
		for i, ct := range a.cts {
			x := ct
			if p.changesBasis() {
				pp := p.poly.Clone()
				scalar, constant := pp.ChangeOfBasis()
				var err error
				if x, err = w.eval.MulNew(ct, new(big.Float).Set(scalar)); err != nil {
					return internalf("polynomial: %v", err)
				}
				if err = w.eval.Add(x, new(big.Float).Set(constant), x); err != nil {
					return internalf("polynomial: %v", err)
				}
				if err = w.eval.Rescale(x, x); err != nil {
					return internalf("polynomial: %v", err)
				}
			}
			res, err := pe.Evaluate(x, hefloat.NewPolynomial(p.poly.Clone()), ct.Scale)
			if err != nil {
				return internalf("polynomial: %v", err)
			}
			cts[i] = res
		}
		out = a.derive(cts, a.length, true)
		return nil
	})
	return out, err
}
