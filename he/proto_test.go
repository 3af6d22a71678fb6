package he

import (
	"testing"

	"buf.build/go/protovalidate"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"google.golang.org/protobuf/proto"
)

// TestProtovalidateRules checks that the messages this package produces satisfy the
// proto's validation rules, and that the rules refuse what they are meant to.
func TestProtovalidateRules(t *testing.T) {
	f := mustFixture(t)
	v, _ := MarshalVector(f.enc(t, []float64{1, 2}))
	pk, _ := MarshalPublicKey(f.client.PublicKey())
	m := MarshalManifest(f.keys.Manifest())
	id, _ := f.keys.ID()
	header := &hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Header{Header: &hev1.UploadHeader{
		KeyId: string(id), ParamId: string(ParamsN13().ID()), TotalSize: 100, Offset: 0,
	}}}
	for name, msg := range map[string]proto.Message{"vector": v, "public key": pk, "manifest": m, "upload header": header} {
		if err := protovalidate.Validate(msg); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	bad := map[string]proto.Message{
		"param ID":      &hev1.EncryptedVector{ParamId: "xyz", Length: 1, Slots: 4096, Layout: hev1.Layout_LAYOUT_CONTIGUOUS, Ciphertexts: v.Ciphertexts},
		"zero length":   &hev1.EncryptedVector{ParamId: v.ParamId, Slots: 4096, Layout: hev1.Layout_LAYOUT_CONTIGUOUS, Ciphertexts: v.Ciphertexts},
		"no layout":     &hev1.EncryptedVector{ParamId: v.ParamId, Length: 1, Slots: 4096, Ciphertexts: v.Ciphertexts},
		"no ciphertext": &hev1.EncryptedVector{ParamId: v.ParamId, Length: 1, Slots: 4096, Layout: hev1.Layout_LAYOUT_CONTIGUOUS},
		"scale":         &hev1.Ciphertext{ParamId: v.ParamId, Scale: -1, C0: make([]byte, 8192)},
		"short c0":      &hev1.Ciphertext{ParamId: v.ParamId, Scale: 1, C0: make([]byte, 8)},
		"long seed":     &hev1.Ciphertext{ParamId: v.ParamId, Scale: 1, C0: make([]byte, 8192), Seed: make([]byte, 33)},
		"key ID":        &hev1.GetUploadStatusRequest{KeyId: "ABC"},
		"empty chunk":   &hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Chunk{}},
		"big chunk":     &hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Chunk{Chunk: make([]byte, 1<<20+1)}},
		"no part":       &hev1.UploadEvaluationKeysRequest{},
		"dup elements":  &hev1.KeyManifest{ParamId: v.ParamId, GaloisElements: []uint64{5, 5}},
		"procedure":     &hev1.GetKeyManifestRequest{},
	}
	for name, msg := range bad {
		if err := protovalidate.Validate(msg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
