package natsstate

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/veilrpc/veil/pqkex"
)

// ReplayStore is a pqkex.ReplayStore shared by a service's replicas through the KV bucket
// PREFIX-replay-SERVICE (docs/pqkex.md section 6.4, as RFC 8446 section 8 for 0-RTT): a
// sealed call is accepted once across all replicas. Each accepted call is one key, the hex
// of pqkex's call key, created only if absent (so exactly one replica wins), and the bucket
// forgets keys after pqkex.ReplayRecordLifetime, when the call could no longer open. One
// round trip per call: give it only the procedures whose side effects must not repeat
// (pqkex.WithReplayStore).
type ReplayStore struct {
	s  *State
	kv jetstream.KeyValue
}

var _ pqkex.ReplayStore = (*ReplayStore)(nil)

// ReplayStore opens (creating if needed) service's replay bucket, whose records live
// pqkex.ReplayRecordLifetime.
func (s *State) ReplayStore(ctx context.Context, service string) (*ReplayStore, error) {
	lifetime := pqkex.ReplayRecordLifetime
	bucket, err := serviceBucket("replay", service)
	if err != nil {
		return nil, err
	}
	kv, err := s.keyValue(ctx, jetstream.KeyValueConfig{
		Bucket: bucket, Description: "Veil: pqkex calls accepted by " + service, History: 1, TTL: lifetime,
	})
	if err != nil {
		return nil, err
	}
	return &ReplayStore{s: s, kv: kv}, nil
}

// Accept implements pqkex.ReplayStore.
func (r *ReplayStore) Accept(ctx context.Context, call []byte, _ time.Time) (bool, error) {
	ctx, cancel := r.s.ctx(ctx)
	defer cancel()
	key := hex.EncodeToString(call)
	_, err := r.kv.Create(ctx, key, nil)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyExists):
		return false, nil
	}
	return false, fmt.Errorf("natsstate: replay: %w", err)
}
