package he

import (
	"context"
	"math"
	"sync"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/he/hefloat"
)

// Matrix is a plaintext rows x cols matrix prepared for MatVec: its generalized
// diagonals, and their encodings cached per level (encoding is the costly part, so
// build a Matrix once and reuse it). Safe for concurrent use.
type Matrix struct {
	params     *Parameters
	rows, cols int
	diags      hefloat.Diagonals[float64]

	mu  sync.Mutex
	lts map[int]hefloat.LinearTransformation
}

// NewMatrix prepares m (rows x cols, both at most Slots) for MatVec.
func NewMatrix(params *Parameters, m [][]float64) (*Matrix, error) {
	if params == nil {
		return nil, invalidf("nil parameters")
	}
	rows := len(m)
	if rows == 0 || rows > params.Slots() {
		return nil, invalidf("matrix: %d rows out of range [1, %d]", rows, params.Slots())
	}
	cols := len(m[0])
	if cols == 0 || cols > params.Slots() {
		return nil, invalidf("matrix: %d columns out of range [1, %d]", cols, params.Slots())
	}
	for i, r := range m {
		if len(r) != cols {
			return nil, invalidf("matrix: row %d has %d columns, row 0 has %d", i, len(r), cols)
		}
		for _, x := range r {
			if math.IsNaN(x) || math.IsInf(x, 0) {
				return nil, invalidf("matrix: value in row %d not finite", i)
			}
		}
	}
	S := params.Slots()
	diags := hefloat.Diagonals[float64]{}
	for _, k := range matVecDiagonals(S, rows, cols) {
		d := make([]float64, S)
		for i := range rows {
			if j := (i + k) % S; j < cols {
				d[i] = m[i][j]
			}
		}
		diags[k] = d
	}
	return &Matrix{params: params, rows: rows, cols: cols, diags: diags, lts: map[int]hefloat.LinearTransformation{}}, nil
}

// matVecDiagonals lists every generalized diagonal a dense rows x cols matrix can
// occupy in an S-slot rotation: k = (j - i) mod S. All are always encoded (zeros
// included), so that the Galois keys depend only on the shape (NeedMatVec).
func matVecDiagonals(S, rows, cols int) []int {
	var out []int
	for k := -(rows - 1); k < cols; k++ {
		out = append(out, ((k%S)+S)%S)
	}
	return out
}

func matVecLTParams(p *Parameters, rows, cols, level int) hefloat.LinearTransformationParameters {
	return hefloat.LinearTransformationParameters{
		DiagonalsIndexList:       matVecDiagonals(p.Slots(), rows, cols),
		Level:                    level,
		Scale:                    rlwe.NewScale(p.p.Q()[level]),
		LogDimensions:            p.p.LogMaxDimensions(),
		LogBabyStepGianStepRatio: 1,
	}
}

// Rows returns the number of rows.
func (m *Matrix) Rows() int { return m.rows }

// Cols returns the number of columns.
func (m *Matrix) Cols() int { return m.cols }

func (m *Matrix) at(w *evalWorker, level int) (hefloat.LinearTransformation, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if lt, ok := m.lts[level]; ok {
		return lt, nil
	}
	lt := hefloat.NewLinearTransformation(m.params.p, matVecLTParams(m.params, m.rows, m.cols, level))
	if err := hefloat.EncodeLinearTransformation[float64](w.enc, m.diags, lt); err != nil {
		return lt, internalf("matrix encoding: %v", err)
	}
	m.lts[level] = lt
	return lt, nil
}

// MatVec returns m * a for an encrypted vector of length m.Cols() held in one
// ciphertext; the result has length m.Rows(). Baby-step giant-step over the
// generalized diagonals: about 2*sqrt(rows+cols) rotations, 1 level, and the Galois
// keys of NeedMatVec(rows, cols). Slots of a past Cols are multiplied by zero.
func (e *Evaluator) MatVec(ctx context.Context, m *Matrix, a *Vector) (out *Vector, err error) {
	if err := e.check("matvec", a); err != nil {
		return nil, err
	}
	if m == nil || m.params.id != e.params.id {
		return nil, invalidf("matvec: matrix for other parameters")
	}
	if len(a.cts) != 1 || a.length != m.cols {
		return nil, invalidf("matvec: %dx%d matrix needs a vector of length %d in one ciphertext, have length %d", m.rows, m.cols, m.cols, a.length)
	}
	if err := needLevels("matvec", 1, a); err != nil {
		return nil, err
	}
	level := a.Level()
	for _, g := range hefloat.GaloisElementsForLinearTransformation(e.params.p, matVecLTParams(e.params, m.rows, m.cols, level)) {
		if g != 1 && !e.have.hasGalois(g) {
			return nil, preconditionf("matvec needs the Galois key for element %d (rotation %d), which the evaluation keys lack", g, e.params.p.SolveDiscreteLogGaloisElement(g))
		}
	}
	err = e.do(ctx, "matvec", func(w *evalWorker) error {
		lt, err := m.at(w, level)
		if err != nil {
			return err
		}
		res := rlwe.NewCiphertext(e.params.p, 1, level)
		if err := hefloat.NewLinearTransformationEvaluator(w.eval).Evaluate(a.cts[0], lt, res); err != nil {
			return internalf("matvec: %v", err)
		}
		if err := w.eval.Rescale(res, res); err != nil {
			return internalf("matvec: %v", err)
		}
		out = a.derive([]*rlwe.Ciphertext{res}, m.rows, false)
		return nil
	})
	return out, err
}
