package analytics

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"math"

	"connectrpc.com/connect"

	analyticsv1 "github.com/veilrpc/veil/gen/veil/analytics/v1"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
)

// Privacy is a study's differential privacy (docs/services.md, "Differential
// privacy"): every release spends EpsilonPerRelease of the budget Epsilon.
type Privacy struct {
	Epsilon           float64
	EpsilonPerRelease float64
}

// checkPrivacy checks a study's privacy settings.
func checkPrivacy(m *analyticsv1.Study) error {
	p := m.GetPrivacy()
	if p == nil {
		return nil
	}
	if !(p.GetEpsilon() > 0) || !(p.GetEpsilonPerRelease() > 0) || p.GetEpsilonPerRelease() > p.GetEpsilon() || math.IsInf(p.GetEpsilon(), 0) {
		return errorf(connect.CodeInvalidArgument, "privacy needs 0 < epsilon_per_release <= epsilon, both finite")
	}
	if len(m.GetRanges()) == 0 {
		return errorf(connect.CodeInvalidArgument, "privacy needs declared ranges: they bound the sensitivity")
	}
	return nil
}

// bounds returns, per coordinate, the largest absolute value a clipped record holds.
func bounds(m *analyticsv1.Study) []float64 {
	d := int(m.GetDimension())
	out := make([]float64, d)
	rs := m.GetRanges()
	for j := range d {
		r := rs[0]
		if len(rs) == d {
			r = rs[j]
		}
		out[j] = math.Max(math.Abs(r.GetMin()), math.Abs(r.GetMax()))
	}
	return out
}

// sensitivities returns the L1 sensitivity of each released vector to adding or
// removing one record: the sums move by at most sum_j a_j, the products by
// sum_{i,j} a_i a_j (covariance) or sum_j a_j^2, the histogram by one count per
// coordinate (a_j: the coordinate's largest absolute value, from the ranges).
func sensitivities(m *analyticsv1.Study) (sum, prod, hist float64) {
	a := bounds(m)
	var s, sq float64
	for _, x := range a {
		s += x
		sq += x * x
	}
	prod = sq
	if m.GetCovariance() {
		prod = s * s
	}
	return s, prod, float64(len(a))
}

// laplace draws from Laplace(0, b) with crypto/rand (inverse CDF of a uniform with 53
// random bits).
func laplace(b float64) (float64, error) {
	var buf [8]byte
	for {
		if _, err := rand.Read(buf[:]); err != nil {
			return 0, err
		}
		u := float64(binary.BigEndian.Uint64(buf[:])>>11)/(1<<53) - 0.5 // [-0.5, 0.5)
		if u == -0.5 {
			continue
		}
		if u < 0 {
			return b * math.Log1p(2*u), nil
		}
		return -b * math.Log1p(-2*u), nil
	}
}

// noise returns n values of fresh Laplace noise of scale sensitivity/epsilon,
// encrypted with enc.
func noise(enc *he.Encryptor, n int, sensitivity, epsilon float64) (*he.Vector, error) {
	vals := make([]float64, n)
	for i := range vals {
		x, err := laplace(sensitivity / epsilon)
		if err != nil {
			return nil, errorf(connect.CodeInternal, "randomness")
		}
		vals[i] = x
	}
	v, err := enc.Encrypt(vals)
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	return v, nil
}

// releaseNoise returns the noise of one release for vectors of the given lengths
// (hist 0: none): the release's epsilon split evenly over the vectors.
func (st *study) releaseNoise(enc *he.Encryptor, sumLen, prodLen, histLen int) (ns, np, nh *he.Vector, err error) {
	p := st.meta.GetPrivacy()
	parts := 2.0
	if histLen > 0 {
		parts = 3
	}
	eps := p.GetEpsilonPerRelease() / parts
	ss, sp, sh := sensitivities(st.meta)
	if ns, err = noise(enc, sumLen, ss, eps); err != nil {
		return nil, nil, nil, err
	}
	if np, err = noise(enc, prodLen, sp, eps); err != nil {
		return nil, nil, nil, err
	}
	if histLen > 0 {
		if nh, err = noise(enc, histLen, sh, eps); err != nil {
			return nil, nil, nil, err
		}
	}
	return ns, np, nh, nil
}

// withNoise returns v plus the encrypted noise n.
func (st *study) withNoise(ctx context.Context, v, n *he.Vector) (*he.Vector, error) {
	out, err := st.eval.Add(ctx, v, n)
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	return out, nil
}

// privateRelease adds the noise of one release to the vectors of a single-key study
// with privacy.
func (st *study) privateRelease(ctx context.Context, sum, prod, hist *he.Vector) (*he.Vector, *he.Vector, *he.Vector, error) {
	if st.meta.GetPrivacy() == nil {
		return sum, prod, hist, nil
	}
	histLen := 0
	if hist != nil {
		histLen = hist.Len()
	}
	ns, np, nh, err := st.releaseNoise(st.enc, sum.Len(), prod.Len(), histLen)
	if err != nil {
		return nil, nil, nil, err
	}
	if sum, err = st.withNoise(ctx, sum, ns); err != nil {
		return nil, nil, nil, err
	}
	if prod, err = st.withNoise(ctx, prod, np); err != nil {
		return nil, nil, nil, err
	}
	if hist != nil {
		if hist, err = st.withNoise(ctx, hist, nh); err != nil {
			return nil, nil, nil, err
		}
	}
	return sum, prod, hist, nil
}

// budgetLeft reports whether one more release fits the study's privacy budget (always
// without privacy). st.mu is held.
func (st *study) budgetLeft() bool {
	p := st.meta.GetPrivacy()
	return p == nil || float64(st.releases+1)*p.GetEpsilonPerRelease() <= p.GetEpsilon()*(1+1e-9)
}
