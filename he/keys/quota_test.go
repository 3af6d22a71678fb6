package keys

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"testing"
	"time"

	"github.com/veilrpc/veil/he"

	"connectrpc.com/connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
)

// validSize returns the encoded size of a set with a relinearization key and g
// rotation keys: a size an upload header may declare.
func validSize(g int) int64 {
	rots := make([]int, g)
	for i := range rots {
		rots[i] = i + 1
	}
	return he.EncodedSize(he.NewManifest(smallParams(), he.NeedRelinearization(), he.NeedRotations(rots...)))
}

func randomKeyID(t *testing.T) he.KeyID {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return he.KeyID(hex.EncodeToString(b[:]))
}

// openUpload sends a header (and optionally some chunk bytes) and ends the stream,
// leaving a partial upload behind.
func openUpload(client hev1connect.KeyServiceClient, id he.KeyID, total int64, send int) error {
	stream := client.UploadEvaluationKeys(context.Background())
	err := stream.Send(&hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Header{Header: &hev1.UploadHeader{
		KeyId: string(id), ParamId: string(smallParams().ID()), TotalSize: uint64(total)}}})
	for send > 0 && err == nil {
		n := min(send, ChunkSize)
		err = stream.Send(&hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Chunk{Chunk: make([]byte, n)}})
		send -= n
	}
	// A refused stream fails the sends with EOF; the reason comes with the response.
	_, cerr := stream.CloseAndReceive()
	if cerr != nil {
		return cerr
	}
	return err
}

// keysWork checks that owner's set is held and evaluates with it.
func keysWork(t *testing.T, reg *Registry, owner string, s *smallSet) {
	t.Helper()
	ev, err := reg.Evaluator(owner, s.id)
	if err != nil {
		t.Fatalf("%s's keys: %v", owner, err)
	}
	v, err := s.client.Encrypt([]float64{1, 2, 3})
	if err != nil {
		t.Fatal(err)
	}
	sq, err := ev.Mul(context.Background(), v, v)
	if err != nil {
		t.Fatalf("%s's evaluation: %v", owner, err)
	}
	got, err := s.client.Decrypt(sq)
	if err != nil || got[2] < 8.9 || got[2] > 9.1 {
		t.Fatalf("%s's evaluation: %v %v", owner, got, err)
	}
}

// aliceUploaded starts a key service over a registry with a budget of 8 of alice's
// sets, and uploads alice's set through it.
func aliceUploaded(t *testing.T, alice *smallSet) (*Registry, int64, func(string) hev1connect.KeyServiceClient) {
	t.Helper()
	mem, _ := he.KeySetMemory(smallParams(), alice.data)
	budget := 8 * mem
	reg, err := NewRegistry(smallParams(), WithMemoryBudget(budget))
	if err != nil {
		t.Fatal(err)
	}
	connectAs := testServer(t, reg, nil)
	if _, err := NewUploader(connectAs("spiffe://t/alice"), alice.keys).Upload(context.Background()); err != nil {
		t.Fatal(err)
	}
	return reg, budget, connectAs
}

// TestThreeHeaderAttack: an identity that opens uploads declaring a third of the
// budget each, and sends nothing more, neither evicts other identities' key sets nor
// blocks their uploads.
func TestThreeHeaderAttack(t *testing.T) {
	alice, bob := newSmallSet(t), newSmallSet(t)
	reg, budget, connectAs := aliceUploaded(t, alice)
	ctx := context.Background()
	// The largest valid size the registry accepts for one upload.
	g := 1
	for validSize(g+1) <= budget/3 {
		g++
	}
	mallory := connectAs("spiffe://t/mallory")
	for range 3 {
		err := openUpload(mallory, randomKeyID(t), validSize(g), 0)
		if err != nil && connect.CodeOf(err) != connect.CodeResourceExhausted {
			t.Fatalf("header: %v", err)
		}
	}
	keysWork(t, reg, "spiffe://t/alice", alice)
	// Bob can still upload.
	if _, err := NewUploader(connectAs("spiffe://t/bob"), bob.keys).Upload(ctx); err != nil {
		t.Fatalf("bob's upload after the attack: %v", err)
	}
	keysWork(t, reg, "spiffe://t/bob", bob)
	keysWork(t, reg, "spiffe://t/alice", alice)
}

// TestUploadFloodFromOneIdentity: one identity uploading set after set, and leaving
// partial uploads behind, never evicts another identity's keys.
func TestUploadFloodFromOneIdentity(t *testing.T) {
	alice := newSmallSet(t)
	reg, budget, connectAs := aliceUploaded(t, alice)
	ctx := context.Background()
	mallory := connectAs("spiffe://t/mallory")
	size := int64(len(alice.data))
	for range 16 {
		err := openUpload(mallory, randomKeyID(t), size, int(size/2))
		if err != nil && connect.CodeOf(err) != connect.CodeResourceExhausted {
			t.Fatalf("partial upload: %v", err)
		}
	}
	for range 12 {
		s := newSmallSet(t)
		_, err := NewUploader(mallory, s.keys).Upload(ctx)
		if err != nil && connect.CodeOf(err) != connect.CodeResourceExhausted {
			t.Fatalf("flood upload: %v", err)
		}
		if reg.Used() > budget {
			t.Fatalf("used %d above the budget %d", reg.Used(), budget)
		}
	}
	keysWork(t, reg, "spiffe://t/alice", alice)
	bob := newSmallSet(t)
	if _, err := NewUploader(connectAs("spiffe://t/bob"), bob.keys).Upload(ctx); err != nil {
		t.Fatalf("bob's upload after the flood: %v", err)
	}
	keysWork(t, reg, "spiffe://t/bob", bob)
	keysWork(t, reg, "spiffe://t/alice", alice)
}

// TestUploadHoldExpires: a partial upload is released uploadTTL after it started,
// however often its header is sent again.
func TestUploadHoldExpires(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	reg, _ := NewRegistry(smallParams(), WithTTL(time.Hour, time.Minute), WithClock(func() time.Time { return now }))
	connectAs := testServer(t, reg, nil)
	mallory := connectAs("spiffe://t/mallory")
	id := randomKeyID(t)
	size := validSize(1)
	if err := openUpload(mallory, id, size, 1000); err != nil {
		t.Fatal(err)
	}
	if reg.Used() == 0 {
		t.Fatal("received bytes not charged")
	}
	for range 5 {
		now = now.Add(20 * time.Second)
		// Resuming with the header again (and one more chunk).
		stream := mallory.UploadEvaluationKeys(context.Background())
		_ = stream.Send(&hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Header{Header: &hev1.UploadHeader{
			KeyId: string(id), ParamId: string(smallParams().ID()), TotalSize: uint64(size), Offset: 1000}}})
		_, _ = stream.CloseAndReceive()
	}
	if reg.Used() != 0 {
		t.Errorf("a partial upload held %d bytes 100 seconds after it started (upload TTL 1 minute)", reg.Used())
	}
	st, err := mallory.GetUploadStatus(context.Background(), connect.NewRequest(&hev1.GetUploadStatusRequest{KeyId: string(id)}))
	if err != nil || st.Msg.GetReceived() != 0 {
		t.Errorf("status after expiry: %v %v", st, err)
	}
}

// TestUploadDeclaredSize: a header must declare the size of a key set the
// parameters can encode.
func TestUploadDeclaredSize(t *testing.T) {
	reg, _ := NewRegistry(smallParams())
	mallory := testServer(t, reg, nil)("spiffe://t/mallory")
	for _, total := range []int64{1, validSize(1) + 1, validSize(3) - 8} {
		if err := openUpload(mallory, randomKeyID(t), total, 0); connect.CodeOf(err) != connect.CodeInvalidArgument {
			t.Errorf("declared size %d: %v", total, err)
		}
	}
	if err := openUpload(mallory, randomKeyID(t), validSize(2), 0); err != nil {
		t.Errorf("valid size: %v", err)
	}
}
