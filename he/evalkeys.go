package he

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"runtime"
	"slices"
	"sync"

	"github.com/tuneinsight/lattigo/v5/core/rlwe"
	"github.com/tuneinsight/lattigo/v5/ring"
	"github.com/tuneinsight/lattigo/v5/ring/ringqp"
)

// EvaluationKeys is a set of evaluation keys (relinearization and Galois keys) for one
// secret key. The client generates it for a Manifest and uploads its encoding once;
// the server parses it into the registry. It holds no secret.
type EvaluationKeys struct {
	params *Parameters
	rlk    *rlwe.RelinearizationKey
	gks    map[uint64]*rlwe.GaloisKey
	set    *rlwe.MemEvaluationKeySet
	// seeds of the keys, relinearization first then Galois keys ascending; they let
	// Encode send (seed, b) instead of (a, b).
	seeds [][]byte

	encodeOnce sync.Once
	encoded    []byte
	id         KeyID
}

// ParamID returns the ID of the keys' parameters.
func (k *EvaluationKeys) ParamID() ParamID { return k.params.id }

// Manifest returns the manifest the keys satisfy.
func (k *EvaluationKeys) Manifest() *Manifest {
	m := &Manifest{params: k.params, relin: k.rlk != nil}
	for g := range k.gks {
		m.galEls = append(m.galEls, g)
	}
	m.normalize()
	return m
}

// keyJob is one evaluation key being generated.
type keyJob struct {
	galEl uint64 // 0 for the relinearization key
	seed  []byte
	skIn  ring.Poly
	skOut ringqp.Poly
	evk   *rlwe.EvaluationKey
}

// GenEvaluationKeys generates exactly the keys m asks for. Keys and the rows of each
// key are independent, so they are generated in parallel on GOMAXPROCS goroutines.
// Each row's uniform part comes from a PRNG keyed by a per-key seed, which lets the
// encoding carry the seed instead of the row (half the bytes, as SEAL does).
func (c *Client) GenEvaluationKeys(m *Manifest) (keys *EvaluationKeys, err error) {
	defer recoverInto(&err, "evaluation key generation")
	if m == nil {
		return nil, invalidf("nil manifest")
	}
	if m.params.id != c.params.id {
		return nil, paramMismatch("manifest", m.params.id, c.params.id)
	}
	p := c.params.p
	sk := c.sk.sk
	keys = &EvaluationKeys{params: c.params, gks: map[uint64]*rlwe.GaloisKey{}}
	var jobs []*keyJob
	ringQ, ringP := p.RingQ(), p.RingP()
	if m.relin {
		keys.rlk = rlwe.NewRelinearizationKey(p)
		skIn := ringQ.NewPoly()
		ringQ.MulCoeffsMontgomery(sk.Value.Q, sk.Value.Q, skIn)
		jobs = append(jobs, &keyJob{skIn: skIn, skOut: sk.Value, evk: &keys.rlk.EvaluationKey})
	}
	for _, g := range m.galEls {
		gk := rlwe.NewGaloisKey(p)
		gk.GaloisElement, gk.NthRoot = g, ringQ.NthRoot()
		keys.gks[g] = gk
		idx, err := ring.AutomorphismNTTIndex(ringQ.N(), ringQ.NthRoot(), p.ModInvGaloisElement(g))
		if err != nil {
			return nil, invalidf("Galois element %d", g)
		}
		skOut := p.RingQP().NewPoly()
		ringQ.AutomorphismNTTWithIndex(sk.Value.Q, idx, skOut.Q)
		ringP.AutomorphismNTTWithIndex(sk.Value.P, idx, skOut.P)
		jobs = append(jobs, &keyJob{galEl: g, skIn: sk.Value.Q, skOut: skOut, evk: &gk.EvaluationKey})
	}
	for _, j := range jobs {
		if j.seed, err = newSeed(); err != nil {
			return nil, err
		}
		keys.seeds = append(keys.seeds, j.seed)
	}
	if err := genRows(c.params, jobs); err != nil {
		return nil, err
	}
	gkList := make([]*rlwe.GaloisKey, 0, len(keys.gks))
	for _, g := range m.galEls {
		gkList = append(gkList, keys.gks[g])
	}
	keys.set = rlwe.NewMemEvaluationKeySet(keys.rlk, gkList...)
	return keys, nil
}

// genRows encrypts zero into every row of every job (in parallel), then adds the
// gadget vector times skIn to each key.
func genRows(params *Parameters, jobs []*keyJob) (err error) {
	type row struct {
		job  *keyJob
		i, j int
	}
	var rows []row
	for _, jb := range jobs {
		for i := range jb.evk.Value {
			for j := range jb.evk.Value[i] {
				rows = append(rows, row{jb, i, j})
			}
		}
	}
	workers := min(runtime.GOMAXPROCS(0), len(rows))
	ch := make(chan row)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				if r := recover(); r != nil {
					mu.Lock()
					err = internalf("evaluation key generation failed")
					mu.Unlock()
					for range ch {
					}
				}
			}()
			g, gerr := newGaussian()
			if gerr != nil {
				panic(gerr)
			}
			ringQP := params.p.RingQP().AtLevel(params.p.MaxLevelQ(), params.p.MaxLevelP())
			e := make([]int64, params.N())
			for r := range ch {
				row := []ringqp.Poly(r.job.evk.Value[r.i][r.j])
				// The uniform part a comes from the row's seed, exactly as
				// ParseEvaluationKeys regenerates it; then b = -a*s + e.
				uniformFromSeed(params, rowSeed(r.job.seed, r.i, r.j)).AtLevel(ringQP.LevelQ(), ringQP.LevelP()).Read(row[1])
				encryptZeroRow(ringQP, params.p.Q(), params.p.P(), r.job.skOut, row, g, e)
			}
		}()
	}
	for _, r := range rows {
		ch <- r
	}
	close(ch)
	wg.Wait()
	if err != nil {
		return err
	}
	var wg2 sync.WaitGroup
	for _, jb := range jobs {
		wg2.Add(1)
		go func() {
			defer wg2.Done()
			buff := params.p.RingQ().NewPoly()
			_ = rlwe.AddPolyTimesGadgetVectorToGadgetCiphertext(jb.skIn, []rlwe.GadgetCiphertext{jb.evk.GadgetCiphertext}, *params.p.RingQP(), buff)
		}()
	}
	wg2.Wait()
	return nil
}

// maxGaloisKeys bounds the number of Galois keys one set may hold.
const maxGaloisKeys = 4096

// keyShape describes the polynomial layout of one evaluation key.
type keyShape struct {
	rows     [][2]int // (i, j) pairs in order
	levelQ   int
	levelP   int
	n        int
	polyLen  int // words per QP polynomial
	rowBytes int // packed bytes of one row's b part
}

func shapeOf(params *Parameters) keyShape {
	gc := rlwe.NewGadgetCiphertext(params.p, 0, params.p.MaxLevelQ(), params.p.MaxLevelP(), 0)
	s := keyShape{levelQ: params.p.MaxLevelQ(), levelP: params.p.MaxLevelP(), n: params.N()}
	for i := range gc.Value {
		for j := range gc.Value[i] {
			s.rows = append(s.rows, [2]int{i, j})
		}
	}
	s.polyLen = (s.levelQ + 1 + s.levelP + 1) * s.n
	s.rowBytes = polyBytes(params.p.Q(), s.n) + polyBytes(params.p.P(), s.n)
	return s
}

// keyBytes returns the seeded encoded size of one key.
func (s keyShape) keyBytes() int { return SeedSize + len(s.rows)*s.rowBytes }

// keyMemory returns the in-memory size of one parsed key (a and b parts).
func (s keyShape) keyMemory() int64 { return int64(len(s.rows)) * 2 * int64(s.polyLen) * 8 }

const keysMagic = "VHK1"

// keysHeaderLen returns the length of the encoding header for nGal Galois keys.
func keysHeaderLen(nGal int) int { return 4 + 16 + 1 + 4 + 8*nGal }

// EncodedSize returns the number of bytes Encode produces for a manifest m.
func EncodedSize(m *Manifest) int64 {
	s := shapeOf(m.params)
	return int64(keysHeaderLen(len(m.galEls))) + int64(m.Len())*int64(s.keyBytes())
}

// MemorySize returns the bytes the parsed keys occupy in memory (about twice the
// seeded encoding). The registry charges this against its budget.
func MemorySize(m *Manifest) int64 {
	return int64(m.Len()) * shapeOf(m.params).keyMemory()
}

// Encode returns the seeded encoding of the keys: a header (magic "VHK1", the 16-byte
// parameter ID, a relinearization flag, the Galois elements), then for each key its
// 32-byte seed and the b part of every row, packed limb by limb (see packing.go). Only keys generated by a Client can be encoded (parsed keys have no
// seeds); the result is cached.
func (k *EvaluationKeys) Encode() ([]byte, error) {
	if k.seeds == nil {
		return nil, preconditionf("parsed evaluation keys cannot be re-encoded")
	}
	k.encodeOnce.Do(func() {
		m := k.Manifest()
		s := shapeOf(k.params)
		out := make([]byte, 0, EncodedSize(m))
		out = append(out, keysMagic...)
		pid, _ := hex.DecodeString(string(k.params.id))
		out = append(out, pid...)
		out = append(out, boolByte(m.relin))
		out = binary.BigEndian.AppendUint32(out, uint32(len(m.galEls)))
		for _, g := range m.galEls {
			out = binary.BigEndian.AppendUint64(out, g)
		}
		for idx, evk := range k.ordered() {
			out = append(out, k.seeds[idx]...)
			for _, r := range s.rows {
				out = appendQP(k.params, out, evk.Value[r[0]][r[1]][0])
			}
		}
		k.encoded = out
		sum := sha256.Sum256(out)
		k.id = KeyID(hex.EncodeToString(sum[:]))
	})
	return k.encoded, nil
}

// ID returns the key ID (SHA-256 of Encode's output).
func (k *EvaluationKeys) ID() (KeyID, error) {
	if k.id != "" {
		return k.id, nil
	}
	if _, err := k.Encode(); err != nil {
		return "", err
	}
	return k.id, nil
}

// ordered returns the keys in encoding order: relinearization, then Galois ascending.
func (k *EvaluationKeys) ordered() []*rlwe.EvaluationKey {
	var out []*rlwe.EvaluationKey
	if k.rlk != nil {
		out = append(out, &k.rlk.EvaluationKey)
	}
	gs := make([]uint64, 0, len(k.gks))
	for g := range k.gks {
		gs = append(gs, g)
	}
	slices.Sort(gs)
	for _, g := range gs {
		out = append(out, &k.gks[g].EvaluationKey)
	}
	return out
}

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}

func appendQP(params *Parameters, out []byte, p ringqp.Poly) []byte {
	out = appendPoly(out, p.Q, params.p.Q())
	return appendPoly(out, p.P, params.p.P())
}

// ParseEvaluationKeys parses and validates an encoding produced by Encode: the
// parameter ID, the key count and every size must match params exactly, every word
// must be reduced modulo its prime; the uniform parts are regenerated from the seeds.
func ParseEvaluationKeys(params *Parameters, data []byte) (keys *EvaluationKeys, err error) {
	defer recoverInto(&err, "parse evaluation keys")
	if params == nil {
		return nil, invalidf("nil parameters")
	}
	if len(data) < keysHeaderLen(0) || string(data[:4]) != keysMagic {
		return nil, invalidf("evaluation keys: bad header")
	}
	pid := ParamID(hex.EncodeToString(data[4:20]))
	if pid != params.id {
		return nil, paramMismatch("evaluation keys", pid, params.id)
	}
	relin := data[20]
	if relin > 1 {
		return nil, invalidf("evaluation keys: bad flags")
	}
	nGal := int(binary.BigEndian.Uint32(data[21:25]))
	if nGal > maxGaloisKeys {
		return nil, invalidf("evaluation keys: %d Galois keys exceed %d", nGal, maxGaloisKeys)
	}
	s := shapeOf(params)
	nKeys := nGal + int(relin)
	if nKeys == 0 {
		return nil, invalidf("evaluation keys: empty set")
	}
	want := int64(keysHeaderLen(nGal)) + int64(nKeys)*int64(s.keyBytes())
	if int64(len(data)) != want {
		return nil, invalidf("evaluation keys: %d bytes, want %d", len(data), want)
	}
	b := data[25:]
	m := &Manifest{params: params, relin: relin == 1}
	twoN := uint64(2 * params.N())
	for i := range nGal {
		g := binary.BigEndian.Uint64(b[8*i:])
		if g&1 == 0 || g >= twoN || g == 1 || (i > 0 && g <= m.galEls[i-1]) || !params.isRotation(g) {
			return nil, invalidf("evaluation keys: bad or unsorted Galois element %d", g)
		}
		m.galEls = append(m.galEls, g)
	}
	b = b[8*nGal:]
	keys = &EvaluationKeys{params: params, gks: map[uint64]*rlwe.GaloisKey{}}
	var evks []*rlwe.EvaluationKey
	if m.relin {
		keys.rlk = rlwe.NewRelinearizationKey(params.p)
		evks = append(evks, &keys.rlk.EvaluationKey)
	}
	gkList := make([]*rlwe.GaloisKey, 0, nGal)
	for _, g := range m.galEls {
		gk := rlwe.NewGaloisKey(params.p)
		gk.GaloisElement, gk.NthRoot = g, params.p.RingQ().NthRoot()
		keys.gks[g] = gk
		gkList = append(gkList, gk)
		evks = append(evks, &gk.EvaluationKey)
	}
	for _, evk := range evks {
		seed := b[:SeedSize]
		b = b[SeedSize:]
		for _, r := range s.rows {
			v := evk.Value[r[0]][r[1]]
			if b, err = readPoly(b, v[0].Q, params.p.Q()); err != nil {
				return nil, err
			}
			if b, err = readPoly(b, v[0].P, params.p.P()); err != nil {
				return nil, err
			}
			uniformFromSeed(params, rowSeed(seed, r[0], r[1])).AtLevel(s.levelQ, s.levelP).Read(v[1])
		}
	}
	keys.set = rlwe.NewMemEvaluationKeySet(keys.rlk, gkList...)
	sum := sha256.Sum256(data)
	keys.id = KeyID(hex.EncodeToString(sum[:]))
	return keys, nil
}

// KeySetMemory returns the in-memory size of an encoded key set from its header, after
// checking that the header agrees with the data's length (so that a bogus header
// cannot make the registry evict other sets to make room).
func KeySetMemory(params *Parameters, data []byte) (int64, error) {
	if len(data) < keysHeaderLen(0) || string(data[:4]) != keysMagic || data[20] > 1 {
		return 0, invalidf("evaluation keys: bad header")
	}
	nGal := int(binary.BigEndian.Uint32(data[21:25]))
	if nGal > maxGaloisKeys {
		return 0, invalidf("evaluation keys: %d Galois keys exceed %d", nGal, maxGaloisKeys)
	}
	s := shapeOf(params)
	nKeys := int64(nGal + int(data[20]))
	if want := int64(keysHeaderLen(nGal)) + nKeys*int64(s.keyBytes()); int64(len(data)) != want {
		return 0, invalidf("evaluation keys: %d bytes, want %d", len(data), want)
	}
	return nKeys * s.keyMemory(), nil
}

// KeySetMemoryForSize returns the in-memory size of a key set whose encoding is total
// bytes, and false when no set encodes to that size: the header's fixed part, 8 bytes
// per Galois key and the keys themselves (with or without a relinearization key) must
// add up. A registry sizes an upload with it before the bytes arrive.
func KeySetMemoryForSize(params *Parameters, total int64) (int64, bool) {
	kb := int64(shapeOf(params).keyBytes())
	rest := total - int64(keysHeaderLen(0))
	for relin := int64(0); relin <= 1; relin++ {
		r := rest - relin*kb
		if r < 0 || r%(8+kb) != 0 {
			continue
		}
		if g := r / (8 + kb); g <= maxGaloisKeys && g+relin > 0 {
			return (g + relin) * shapeOf(params).keyMemory(), true
		}
	}
	return 0, false
}
