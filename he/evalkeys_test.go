package he

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math"
	"math/bits"
	"sync"
	"testing"
)

// smallParams keeps registry tests fast: one key is about 197 KB encoded.
var smallParams = sync.OnceValue(func() *Parameters {
	p, err := NewParameters(Literal{LogN: 12, LogQ: []int{36, 30}, LogP: []int{36}, LogDefaultScale: 30})
	if err != nil {
		panic(err)
	}
	return p
})

type smallSet struct {
	client *Client
	keys   *EvaluationKeys
	data   []byte
	id     KeyID
}

func newSmallSet(t testing.TB, needs ...Need) *smallSet {
	t.Helper()
	c, err := NewClient(smallParams())
	if err != nil {
		t.Fatal(err)
	}
	if len(needs) == 0 {
		needs = []Need{NeedRelinearization(), NeedRotations(1)}
	}
	keys, err := c.GenEvaluationKeys(NewManifest(smallParams(), needs...))
	if err != nil {
		t.Fatal(err)
	}
	data, err := keys.Encode()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := keys.ID()
	return &smallSet{client: c, keys: keys, data: data, id: id}
}

func TestEvaluationKeysEncoding(t *testing.T) {
	f := mustFixture(t)
	p := ParamsN13()
	data, err := f.keys.Encode()
	if err != nil {
		t.Fatal(err)
	}
	m := f.keys.Manifest()
	if int64(len(data)) != EncodedSize(m) {
		t.Fatalf("encoded %d bytes, EncodedSize says %d", len(data), EncodedSize(m))
	}
	// Seeded (half the polynomials) and packed (bitlen(q) of 64 bits per coefficient,
	// about 200 of 256 for N13): about 2.55 times smaller than the keys in memory.
	moduli := append(append([]uint64{}, p.p.Q()...), p.p.P()...)
	packedBits := 0
	for _, q := range moduli {
		packedBits += bits.Len64(q)
	}
	want := 2 * float64(64*len(moduli)) / float64(packedBits)
	if r := float64(MemorySize(m)) / float64(len(data)); math.Abs(r-want) > 0.01 {
		t.Errorf("the encoding is 1/%.3f of the keys in memory, want 1/%.3f", r, want)
	}
	sum := sha256.Sum256(data)
	if id, _ := f.keys.ID(); string(id) != hex.EncodeToString(sum[:]) {
		t.Error("key ID is not the SHA-256 of the encoding")
	}
	parsed, err := ParseEvaluationKeys(p, data)
	if err != nil {
		t.Fatal(err)
	}
	if !parsed.Manifest().Covers(m) || !m.Covers(parsed.Manifest()) {
		t.Error("parsed manifest differs")
	}
	if _, err := parsed.Encode(); kindOf(err) != KindPrecondition {
		t.Errorf("re-encoding parsed keys: %v", err)
	}
	// The parsed keys work: rotation and multiplication through them.
	ev, _ := NewEvaluator(p, parsed)
	x := f.enc(t, []float64{0.1, 0.2, 0.3, 0.4})
	ctx := context.Background()
	rot, err := ev.Rotate(ctx, x, 3)
	if err != nil {
		t.Fatal(err)
	}
	if got := f.dec(t, rot); maxErr(t, got, []float64{0.4, 0, 0, 0}) > boundFresh {
		t.Errorf("rotation with parsed keys: %v", got)
	}
	sq, err := ev.Mul(ctx, x, x)
	if err != nil {
		t.Fatal(err)
	}
	if got := f.dec(t, sq); maxErr(t, got, []float64{0.01, 0.04, 0.09, 0.16}) > boundMul {
		t.Errorf("multiplication with parsed keys: %v", got)
	}
}

func TestEvaluationKeysBadInput(t *testing.T) {
	s := newSmallSet(t)
	p := smallParams()
	data := s.data
	header := keysHeaderLen(1)
	shape := shapeOf(p)
	for _, n := range []int{0, 3, 20, 24, header - 1, header, header + 31, header + 100, len(data) - 1} {
		if _, err := ParseEvaluationKeys(p, data[:n]); kindOf(err) != KindInvalid {
			t.Errorf("truncated to %d: %v", n, err)
		}
	}
	if _, err := ParseEvaluationKeys(p, append(bytes.Clone(data), 0)); kindOf(err) != KindInvalid {
		t.Errorf("extended: %v", err)
	}
	mutate := func(name string, code Kind, f func(b []byte)) {
		b := bytes.Clone(data)
		f(b)
		if _, err := ParseEvaluationKeys(p, b); kindOf(err) != code {
			t.Errorf("%s: %v", name, err)
		}
	}
	mutate("magic", KindInvalid, func(b []byte) { b[0] = 'X' })
	mutate("param ID", KindPrecondition, func(b []byte) { b[4] ^= 1 })
	mutate("flags", KindInvalid, func(b []byte) { b[20] = 2 })
	mutate("Galois count", KindInvalid, func(b []byte) { b[21] = 0xff })
	mutate("even Galois element", KindInvalid, func(b []byte) { b[header-1] &^= 1 })
	mutate("unreduced coefficient", KindInvalid, func(b []byte) {
		setCoeff(b[header+SeedSize:], p.p.Q(), shape.n, 0, 7, p.p.Q()[0])
	})
	mutate("unreduced P coefficient", KindInvalid, func(b []byte) {
		setCoeff(b[header+SeedSize+polyBytes(p.p.Q(), shape.n):], p.p.P(), shape.n, 0, 0, p.p.P()[0])
	})
	if _, err := ParseEvaluationKeys(ParamsN13(), data); kindOf(err) != KindPrecondition {
		t.Errorf("other parameters: %v", err)
	}
	// A key set whose seed was altered parses (seeds are not authenticated by the
	// format) but its ID changes, so the registry refuses it under the old ID.
	b := bytes.Clone(data)
	b[header] ^= 1
	sum := sha256.Sum256(b)
	if hex.EncodeToString(sum[:]) == string(s.id) {
		t.Error("altered keys kept their ID")
	}
}

func TestManifestRefusesNonRotations(t *testing.T) {
	p := smallParams()
	w := MarshalManifest(NewManifest(p, NeedRotations(1)))
	w.GaloisElements = append(w.GaloisElements, uint64(2*p.N()-1)) // conjugation
	if _, err := UnmarshalManifest(p, w); kindOf(err) != KindInvalid {
		t.Errorf("conjugation element accepted: %v", err)
	}
}
