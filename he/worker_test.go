package he

import (
	"context"
	"math"
	"runtime"
	"testing"

	"github.com/tuneinsight/lattigo/v5/he/hefloat"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
)

// TestWorkerMemory: WorkerMemory covers what creating one evaluation worker
// allocates, without overstating it more than twice.
func TestWorkerMemory(t *testing.T) {
	for _, params := range []*Parameters{smallParams(), ParamsN13()} {
		pool, _ := NewWorkerPool(params, 1)
		tmpl := pool.template()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		w := &evalWorker{eval: tmpl.ShallowCopy(), enc: hefloat.NewEncoder(hefloat.Parameters{Parameters: params.p})}
		runtime.ReadMemStats(&after)
		runtime.KeepAlive(w)
		got, est := int64(after.TotalAlloc-before.TotalAlloc), WorkerMemory(params)
		if est < got || est > 2*got {
			t.Errorf("%s: a worker allocates %d bytes, WorkerMemory says %d", params, got, est)
		}
	}
}

// TestKeyFingerprints: vectors under different keys are refused when combined, also
// after a trip over the wire, and by a client decrypting another key's vector.
func TestKeyFingerprints(t *testing.T) {
	a, b := newSmallSet(t), newSmallSet(t)
	ev, err := NewEvaluator(smallParams(), a.keys)
	if err != nil {
		t.Fatal(err)
	}
	va, _ := a.client.Encrypt([]float64{1, 2})
	vb, _ := b.client.Encrypt([]float64{3, 4})
	pub, _ := NewEncryptor(a.client.PublicKey())
	vp, _ := pub.Encrypt([]float64{5, 6})
	wire := func(v *Vector) *Vector {
		m, err := MarshalVector(v)
		if err != nil {
			t.Fatal(err)
		}
		out, err := UnmarshalVector(smallParams(), m)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	ctx := context.Background()
	if _, err := ev.Add(ctx, wire(va), wire(vb)); kindOf(err) != KindPrecondition {
		t.Errorf("sum of two keys' vectors: %v", err)
	}
	if _, err := ev.LinearCombination(ctx, []*Vector{va, vp, vb}, []float64{1, 1, 1}, 0); kindOf(err) != KindPrecondition {
		t.Errorf("linear combination across keys: %v", err)
	}
	sum, err := ev.Add(ctx, wire(va), wire(vp)) // secret-key and public-key vectors of one key pair
	if err != nil {
		t.Fatalf("one key pair: %v", err)
	}
	if _, err := b.client.Decrypt(sum); kindOf(err) != KindPrecondition {
		t.Errorf("decrypting another key's vector: %v", err)
	}
	if got, err := a.client.Decrypt(wire(sum)); err != nil || math.Abs(got[0]-6) > 1e-3 {
		t.Errorf("own vector: %v %v", got, err)
	}
	m, _ := MarshalVector(va)
	m.KeyFingerprint = m.KeyFingerprint[:5]
	if _, err := UnmarshalVector(smallParams(), m); kindOf(err) != KindInvalid {
		t.Errorf("short fingerprint: %v", err)
	}
	m.KeyFingerprint = nil // an older sender: not checked
	if _, err := ev.Add(ctx, wire(vb), mustUnmarshal(t, m)); err != nil {
		t.Errorf("vector without a fingerprint: %v", err)
	}
}

func mustUnmarshal(t *testing.T, m *hev1.EncryptedVector) *Vector {
	t.Helper()
	v, err := UnmarshalVector(smallParams(), m)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
