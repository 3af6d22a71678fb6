package he

import (
	"math/bits"
	"slices"

	"github.com/tuneinsight/lattigo/v5/he/hefloat"
)

// Manifest lists exactly the evaluation keys a procedure needs: a relinearization key
// for ciphertext-ciphertext multiplication and the Galois keys of its rotations. A
// server declares one per procedure (KeyService.GetKeyManifest); the client generates
// those keys and no others. A Manifest is immutable and holds no key material.
type Manifest struct {
	params *Parameters
	relin  bool
	galEls []uint64 // ascending, unique
}

// Need is one requirement of a procedure, combined by NewManifest. Like an option, it
// is a value with an unexported method: it cannot be applied to a Manifest after
// NewManifest built it.
type Need interface{ addTo(*Parameters, *Manifest) }

type needFunc func(*Parameters, *Manifest)

func (f needFunc) addTo(p *Parameters, m *Manifest) { f(p, m) }

// NeedRelinearization asks for the relinearization key (Mul, Dot, Variance,
// polynomial evaluation).
func NeedRelinearization() Need {
	return needFunc(func(_ *Parameters, m *Manifest) { m.relin = true })
}

// NeedRotations asks for the Galois keys of the given slot rotations (Rotate).
func NeedRotations(ks ...int) Need {
	return needFunc(func(p *Parameters, m *Manifest) {
		for _, k := range ks {
			if k%p.Slots() != 0 {
				m.galEls = append(m.galEls, p.p.GaloisElementForRotation(k))
			}
		}
	})
}

// NeedInnerSum asks for the keys that sum a vector of up to n values (InnerSum, Dot,
// DotPlain, Mean, Variance): rotations by 1, 2, 4, ... below the next power of two of
// min(n, Slots).
func NeedInnerSum(n int) Need {
	return needFunc(func(p *Parameters, m *Manifest) {
		NeedRotations(innerSumRotations(p, n)...).addTo(p, m)
	})
}

func innerSumRotations(p *Parameters, n int) []int {
	n = min(max(n, 1), p.Slots())
	steps := bits.Len(uint(n - 1))
	out := make([]int, steps)
	for i := range steps {
		out[i] = 1 << i
	}
	return out
}

// NeedMatVec asks for the Galois keys of a rows x cols plaintext matrix times an
// encrypted vector (MatVec), evaluated with baby-step giant-step.
func NeedMatVec(rows, cols int) Need {
	return needFunc(func(p *Parameters, m *Manifest) {
		if rows < 1 || cols < 1 || rows > p.Slots() || cols > p.Slots() {
			return
		}
		m.galEls = append(m.galEls, hefloat.GaloisElementsForLinearTransformation(p.p, matVecLTParams(p, rows, cols, p.MaxLevel()))...)
	})
}

// NewManifest combines needs into a manifest for params.
func NewManifest(params *Parameters, needs ...Need) *Manifest {
	m := &Manifest{params: params}
	for _, n := range needs {
		n.addTo(params, m)
	}
	m.normalize()
	return m
}

// normalize sorts the Galois elements and drops duplicates and the identity (1),
// which needs no key.
func (m *Manifest) normalize() {
	m.galEls = slices.DeleteFunc(m.galEls, func(g uint64) bool { return g == 1 })
	slices.Sort(m.galEls)
	m.galEls = slices.Compact(m.galEls)
}

// ParamID returns the ID of the manifest's parameters.
func (m *Manifest) ParamID() ParamID { return m.params.id }

// Relinearization reports whether a relinearization key is needed.
func (m *Manifest) Relinearization() bool { return m.relin }

// GaloisElements returns the Galois elements of the needed rotation keys, ascending.
func (m *Manifest) GaloisElements() []uint64 { return slices.Clone(m.galEls) }

// Rotations returns the slot rotation each Galois element stands for, in the same order.
func (m *Manifest) Rotations() []int {
	out := make([]int, len(m.galEls))
	for i, g := range m.galEls {
		out[i] = m.params.p.SolveDiscreteLogGaloisElement(g)
	}
	return out
}

// Union returns a manifest needing everything m or o needs.
func (m *Manifest) Union(o *Manifest) (*Manifest, error) {
	if m.params.id != o.params.id {
		return nil, paramMismatch("manifest", o.params.id, m.params.id)
	}
	u := &Manifest{params: m.params, relin: m.relin || o.relin, galEls: append(slices.Clone(m.galEls), o.galEls...)}
	u.normalize()
	return u, nil
}

// Covers reports whether keys built for m also serve o.
func (m *Manifest) Covers(o *Manifest) bool {
	if m.params.id != o.params.id || (o.relin && !m.relin) {
		return false
	}
	for _, g := range o.galEls {
		if _, ok := slices.BinarySearch(m.galEls, g); !ok {
			return false
		}
	}
	return true
}

// Len returns the number of keys the manifest asks for.
func (m *Manifest) Len() int {
	n := len(m.galEls)
	if m.relin {
		n++
	}
	return n
}
