package he

import (
	"bytes"
	"testing"

	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"google.golang.org/protobuf/proto"
)

// fuzzSeeds returns valid encodings on smallParams: a seeded and an unseeded vector,
// a public key and an evaluation-key set.
func fuzzSeeds(t testing.TB) (vecSeeded, vecFull, pk []byte, keys []byte) {
	s := newSmallSet(t, NeedRotations(1))
	v, err := s.client.Encrypt([]float64{0.25, -0.5, 1})
	if err != nil {
		t.Fatal(err)
	}
	seeded, _ := MarshalVector(v)
	ev, _ := NewEvaluator(smallParams(), nil)
	sum, err := ev.AddScalar(t.Context(), v, 1)
	if err != nil {
		t.Fatal(err)
	}
	full, _ := MarshalVector(sum)
	pkw, _ := MarshalPublicKey(s.client.PublicKey())
	return mustMarshal(t, seeded), mustMarshal(t, full), mustMarshal(t, pkw), s.data
}

// FuzzUnmarshalVector feeds arbitrary protobuf bytes to the vector decoder: it must
// return an error or a vector that encodes to a message that decodes to the same
// ciphertexts (no panic, no malleability between the two).
func FuzzUnmarshalVector(f *testing.F) {
	seeded, full, _, _ := fuzzSeeds(f)
	f.Add(seeded)
	f.Add(full)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var m hev1.EncryptedVector
		if proto.Unmarshal(b, &m) != nil {
			return
		}
		v, err := UnmarshalVector(smallParams(), &m)
		if err != nil {
			if kindOf(err) == 0 {
				t.Fatalf("error without a code: %v", err)
			}
			return
		}
		again, err := MarshalVector(v)
		if err != nil {
			t.Fatal(err)
		}
		v2, err := UnmarshalVector(smallParams(), again)
		if err != nil {
			t.Fatalf("re-encoded vector refused: %v", err)
		}
		third, _ := MarshalVector(v2)
		if !proto.Equal(again, third) {
			t.Fatal("encoding is not stable")
		}
	})
}

// FuzzParseEvaluationKeys feeds arbitrary bytes to the key-set parser.
func FuzzParseEvaluationKeys(f *testing.F) {
	_, _, _, keys := fuzzSeeds(f)
	f.Add(keys)
	f.Add(keys[:keysHeaderLen(1)])
	f.Add([]byte(keysMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := ParseEvaluationKeys(smallParams(), b)
		if err != nil {
			if kindOf(err) == 0 {
				t.Fatalf("error without a code: %v", err)
			}
			return
		}
		if !bytes.Equal(b[:4], []byte(keysMagic)) || k.Manifest().Len() == 0 {
			t.Fatal("accepted a key set without magic or keys")
		}
	})
}

// FuzzUnmarshalPublicKey feeds arbitrary protobuf bytes to the public-key decoder.
func FuzzUnmarshalPublicKey(f *testing.F) {
	_, _, pk, _ := fuzzSeeds(f)
	f.Add(pk)
	f.Fuzz(func(t *testing.T, b []byte) {
		var m hev1.PublicKey
		if proto.Unmarshal(b, &m) != nil {
			return
		}
		k, err := UnmarshalPublicKey(smallParams(), &m)
		if err != nil {
			return
		}
		again, _ := MarshalPublicKey(k)
		if !proto.Equal(again, &m) {
			t.Fatal("public key does not re-encode to the same message")
		}
	})
}

// FuzzUnmarshalManifest feeds arbitrary protobuf bytes to the manifest decoder.
func FuzzUnmarshalManifest(f *testing.F) {
	f.Add(mustMarshal(f, MarshalManifest(NewManifest(smallParams(), NeedRelinearization(), NeedInnerSum(100)))))
	f.Fuzz(func(t *testing.T, b []byte) {
		var m hev1.KeyManifest
		if proto.Unmarshal(b, &m) != nil {
			return
		}
		mf, err := UnmarshalManifest(smallParams(), &m)
		if err != nil {
			return
		}
		for _, g := range mf.GaloisElements() {
			if g&1 == 0 || g == 1 || g >= uint64(2*smallParams().N()) {
				t.Fatalf("accepted Galois element %d", g)
			}
		}
	})
}
