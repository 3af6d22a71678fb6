package pqkex

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
)

// TestReplayToAnotherReplica sends one sealed call (the first vector's request, with its
// ticket) to two replicas that share ticket keys, as an attacker replaying it to the replica
// whose replay window never saw it would (spec 6.4). Both run the handler, which answers
// differently each time; the two responses must be sealed under different s2c keys, each
// opening only after its own server nonce.
func TestReplayToAnotherReplica(t *testing.T) {
	v, replicaOf, call := katReplicas(t)
	suite, aead := SchemeByName(v.Suite), aeadByName(v.AEAD)
	var executions atomic.Int64
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			t.Error(err)
		}
		// Same length, different plaintext: what would leak their XOR under one key and nonce.
		_, _ = w.Write([]byte("answer " + strconv.FormatInt(executions.Add(1), 10)))
	})
	replica := func() http.Handler { return replicaOf(handler) } // default randomness: crypto/rand
	a, b := replica(), replica()
	ra, rb := call(a), call(b)
	for _, rec := range []*httptest.ResponseRecorder{ra, rb} {
		if rec.Code != http.StatusOK || rec.Header().Get(headerSealed) != "1" || rec.Header().Get(headerError) != "" {
			t.Fatalf("replica refused the call: %d %v", rec.Code, rec.Header())
		}
	}
	// The same replica refuses the replay: its window saw the call ID.
	if rec := call(a); rec.Header().Get(headerError) != string(reasonReplayed) {
		t.Fatalf("replay to the same replica: Veil-Pqkex-Error = %q", rec.Header().Get(headerError))
	}
	if n := executions.Load(); n != 2 {
		t.Fatalf("handler ran %d times, want 2 (once per replica: idempotency is the handler's, spec 6.4)", n)
	}
	bodyA, bodyB := ra.Body.Bytes(), rb.Body.Bytes()
	if len(bodyA) != len(bodyB) || len(bodyA) < serverNonceSize+frameHeaderSize+aeadTagSize {
		t.Fatalf("response lengths %d and %d", len(bodyA), len(bodyB))
	}
	if bytes.Equal(bodyA[:serverNonceSize], bodyB[:serverNonceSize]) {
		t.Fatal("both replicas sent the same server nonce")
	}
	// The first frames: same header (flags, seq 0, length), different ciphertext and tag.
	fa, fb := bodyA[serverNonceSize:], bodyB[serverNonceSize:]
	if !bytes.Equal(fa[:frameHeaderSize], fb[:frameHeaderSize]) {
		t.Fatal("first frame headers differ")
	}
	n := frameHeaderSize + int(uint32(fa[5])<<24|uint32(fa[6])<<16|uint32(fa[7])<<8|uint32(fa[8]))
	if bytes.Equal(fa[frameHeaderSize:n], fb[frameHeaderSize:n]) {
		t.Fatal("first frames are equal")
	}
	// The keystreams differ: XORing the ciphertexts does not give the XOR of the plaintexts
	// (it would under one key and nonce, the flaw this fixes).
	x := make([]byte, len("answer 1"))
	for i := range x {
		x[i] = fa[frameHeaderSize+i] ^ fb[frameHeaderSize+i]
	}
	if bytes.Equal(x, xorBytes([]byte("answer 1"), []byte("answer 2"))) {
		t.Fatal("the two responses share a keystream")
	}

	open := func(body []byte) (string, error) {
		h := suite.Hash()
		keys, err := newCallKeys(h, aead, callRoot(h, v.Session, katServerID, katServerHash(v)), v.CallID, v.Procedure)
		if err != nil {
			return "", err
		}
		o := &opener{r: bytes.NewReader(body)}
		if err := openResponse(o, keys, int64(len(body))); err != nil {
			return "", err
		}
		if _, err := readHead(o, responseHead); err != nil {
			return "", err
		}
		pt, err := io.ReadAll(&openReader{o: o})
		return string(pt), err
	}
	if pt, err := open(bodyA); err != nil || pt != "answer 1" {
		t.Fatalf("replica A's response opens to %q, %v", pt, err)
	}
	if pt, err := open(bodyB); err != nil || pt != "answer 2" {
		t.Fatalf("replica B's response opens to %q, %v", pt, err)
	}
	// Each opens only with its own nonce: swapping them fails the first frame.
	for _, spliced := range [][]byte{
		append(append([]byte(nil), bodyA[:serverNonceSize]...), fb...),
		append(append([]byte(nil), bodyB[:serverNonceSize]...), fa...),
	} {
		if _, err := open(spliced); !isTampered(err) {
			t.Fatalf("response with the other replica's nonce: %v, want tampered", err)
		}
	}
}

func xorBytes(a, b []byte) []byte {
	out := make([]byte, len(a))
	for i := range a {
		out[i] = a[i] ^ b[i]
	}
	return out
}

// isTampered reports whether err is the tampered rejection, as the opener or Read return it.
func isTampered(err error) bool {
	return err != nil && isRejection(err) && reasonOf(err) == reasonTampered
}
