package natsstate

import (
	"bytes"
	"context"
	"errors"
	"io/fs"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
)

// EvaluationKeys is an keys.KeyStore in a JetStream Object Store bucket: one object per
// key set, named by its key ID, with its owner in the object's metadata. JetStream
// splits objects into chunks (128 KiB) and the Put returns once every chunk and the
// object's metadata are acknowledged by the bucket's quorum.
type EvaluationKeys struct {
	s  *State
	os jetstream.ObjectStore
}

var _ keys.KeyStore = (*EvaluationKeys)(nil)

const ownerMeta = "veil-owner"

// EvaluationKeys opens (creating if needed) the PREFIX-evaluation-keys bucket. Key sets
// expire by the registry's TTL, checked against their last save or touch, not by a
// bucket age limit, so that a key set in use is not dropped under its users.
func (s *State) EvaluationKeys(ctx context.Context) (*EvaluationKeys, error) {
	b, err := s.objectStore(ctx, "evaluation-keys", "Veil: clients' CKKS evaluation keys, by SHA-256 key ID")
	if err != nil {
		return nil, err
	}
	return &EvaluationKeys{s: s, os: b}, nil
}

// storeErr maps JetStream's "no such object" to fs.ErrNotExist and keeps other
// errors, which the registry reports as unavailable.
func storeErr(err error) error {
	if errors.Is(err, jetstream.ErrObjectNotFound) || errors.Is(err, jetstream.ErrKeyNotFound) {
		return fs.ErrNotExist
	}
	return err
}

// Save implements keys.KeyStore.
func (k *EvaluationKeys) Save(ctx context.Context, id he.KeyID, owner string, data []byte) error {
	ctx, cancel := k.s.ctx(ctx)
	defer cancel()
	_, err := k.os.Put(ctx, jetstream.ObjectMeta{Name: string(id), Metadata: map[string]string{ownerMeta: owner}}, bytes.NewReader(data))
	return k.s.logged("save evaluation keys", err)
}

// Stat implements keys.KeyStore.
func (k *EvaluationKeys) Stat(ctx context.Context, id he.KeyID) (keys.KeyInfo, error) {
	ctx, cancel := k.s.ctx(ctx)
	defer cancel()
	info, err := k.os.GetInfo(ctx, string(id))
	if err != nil {
		return keys.KeyInfo{}, k.s.logged("stat evaluation keys", storeErr(err))
	}
	if info.Deleted {
		return keys.KeyInfo{}, fs.ErrNotExist
	}
	return keys.KeyInfo{Owner: info.Metadata[ownerMeta], Size: int64(info.Size), Modified: info.ModTime}, nil
}

// Load implements keys.KeyStore. The object store checks the chunks against the
// object's SHA-256 digest; the registry checks the content against the key ID.
func (k *EvaluationKeys) Load(ctx context.Context, id he.KeyID) ([]byte, error) {
	ctx, cancel := k.s.ctx(ctx)
	defer cancel()
	b, err := k.os.GetBytes(ctx, string(id))
	return b, k.s.logged("load evaluation keys", storeErr(err))
}

// Touch implements keys.KeyStore: it rewrites the object's metadata (not its chunks),
// which refreshes its modification time.
func (k *EvaluationKeys) Touch(ctx context.Context, id he.KeyID) error {
	ctx, cancel := k.s.ctx(ctx)
	defer cancel()
	info, err := k.os.GetInfo(ctx, string(id))
	if err != nil {
		return storeErr(err)
	}
	return storeErr(k.os.UpdateMeta(ctx, string(id), info.ObjectMeta))
}

// Delete implements keys.KeyStore.
func (k *EvaluationKeys) Delete(ctx context.Context, id he.KeyID) error {
	ctx, cancel := k.s.ctx(ctx)
	defer cancel()
	if err := k.os.Delete(ctx, string(id)); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return err
	}
	return nil
}
