package natsstate

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilrpc/veil/pqkex"
)

// TicketKeys keeps a pqkex.TicketKeys in step with one service's ticket-key bucket,
// PREFIX-ticket-keys-SERVICE (docs/pqkex.md section 7.1), so that every replica of the
// service seals tickets with the same current key and opens tickets sealed with it or the
// previous one: a session resumes on any replica, and tickets issued before a rotation
// stay valid for one more period (the overlap). Each service has its own bucket: a
// compromised service holds only its own keys and can mint tickets for no other.
//
// The bucket holds one key, "current", with a history of two revisions (the current
// and the previous ticket key), so writing a key removes the one before the previous,
// and an age limit of two and a quarter periods. No replica is in charge of rotation:
// each checks the current key's age, and once it is older than the period, writes the
// next key with Update against the revision it read, which succeeds for exactly one
// replica; the others see its key through their watch. Each replica's key set erases
// the previous key a period after it stopped sealing (pqkex.TicketKeys).
//
// The ticket secrets travel to NATS and back over the TLS connection and rest in
// JetStream's storage: give each service's identity access to its own bucket only (NATS
// authorization) and enable JetStream encryption at rest (docs/deploy.md).
type TicketKeys struct {
	s      *State
	kv     jetstream.KeyValue
	period time.Duration
	keys   *pqkex.TicketKeys

	mu       sync.Mutex
	revision uint64 // of the current key, as last seen
	created  time.Time
}

const ticketKey = "current"

// ticketValue is a ticket key's bucket encoding: "VTK1", the 4-byte ID, the 32-byte
// secret.
const ticketMagic = "VTK1"

func encodeTicketKey(k pqkex.TicketKey) []byte {
	b := append([]byte(ticketMagic), binary.BigEndian.AppendUint32(nil, k.ID)...)
	return append(b, k.Secret[:]...)
}

func decodeTicketKey(b []byte) (pqkex.TicketKey, error) {
	var k pqkex.TicketKey
	if len(b) != len(ticketMagic)+4+32 || string(b[:4]) != ticketMagic {
		return k, errors.New("natsstate: malformed ticket key in the bucket")
	}
	k.ID = binary.BigEndian.Uint32(b[4:8])
	copy(k.Secret[:], b[8:])
	return k, nil
}

// TicketKeys opens (creating if needed) the ticket-key bucket of service, the SPIFFE ID
// of the pqkex server that uses the keys, creates the first key if there is none, and
// returns the replica's view. period is how long a key seals tickets (and opens them after
// that); servers cap tickets at it. Call Run to follow rotations.
func (s *State) TicketKeys(ctx context.Context, service string, period time.Duration) (*TicketKeys, error) {
	if period < time.Second {
		return nil, errors.New("natsstate: ticket-key period under a second")
	}
	bucket, err := TicketKeyBucket(service)
	if err != nil {
		return nil, err
	}
	kv, err := s.keyValue(ctx, jetstream.KeyValueConfig{
		Bucket: bucket, Description: "Veil: pqkex session-ticket keys of " + service + " (secret)", History: 2, TTL: 2*period + period/4,
	})
	if err != nil {
		return nil, err
	}
	t := &TicketKeys{s: s, kv: kv, period: period}
	if err := t.refresh(ctx, true); err != nil {
		return nil, err
	}
	return t, nil
}

// TicketKeyBucket returns the name (without the prefix) of service's ticket-key bucket:
// "ticket-keys-" and the SPIFFE ID's path with every character other than letters, digits,
// '-' and '_' as '_' (at most 64 of them), '-', and 32 hex digits (128 bits) of the ID's SHA-256, so
// that two services never share a bucket.
func TicketKeyBucket(service string) (string, error) { return serviceBucket("ticket-keys", service) }

// serviceBucket is the name of a per-service bucket of kind (TicketKeyBucket).
func serviceBucket(kind, service string) (string, error) {
	id, err := spiffeid.FromString(service)
	if err != nil {
		return "", fmt.Errorf("natsstate: %s: service %q: %w", kind, service, err)
	}
	path := []byte(strings.TrimPrefix(id.Path(), "/"))
	for i, c := range path {
		if keep := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_'; !keep {
			path[i] = '_'
		}
	}
	if len(path) > 64 {
		path = path[:64]
	}
	sum := sha256.Sum256([]byte(id.String()))
	return kind + "-" + string(path) + "-" + hex.EncodeToString(sum[:16]), nil
}

// Keys returns the key set to give pqkex.WithTicketKeys; it changes in place.
func (t *TicketKeys) Keys() *pqkex.TicketKeys { return t.keys }

// CurrentID returns the ID of the key that seals new tickets.
func (t *TicketKeys) CurrentID() uint32 { return t.keys.CurrentID() }

// refresh reads the bucket's current and previous keys into t.keys, creating the
// first key when the bucket has none.
func (t *TicketKeys) refresh(ctx context.Context, create bool) error {
	ctx, cancel := t.s.ctx(ctx)
	defer cancel()
	hist, err := t.kv.History(ctx, ticketKey)
	if errors.Is(err, jetstream.ErrKeyNotFound) && create {
		first, err := pqkex.GenerateTicketKey(1, rand.Reader)
		if err != nil {
			return err
		}
		if _, err := t.kv.Create(ctx, ticketKey, encodeTicketKey(first)); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
			return fmt.Errorf("natsstate: ticket keys: %w", err)
		}
		hist, err = t.kv.History(ctx, ticketKey)
		if err != nil {
			return fmt.Errorf("natsstate: ticket keys: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("natsstate: ticket keys: %w", err)
	}
	var keys []pqkex.TicketKey
	var last jetstream.KeyValueEntry
	for _, e := range hist {
		if e.Operation() != jetstream.KeyValuePut {
			continue
		}
		k, err := decodeTicketKey(e.Value())
		if err != nil {
			return err
		}
		k.Created = e.Created()
		keys = append(keys, k)
		last = e
	}
	if len(keys) == 0 {
		return errors.New("natsstate: ticket keys: the bucket holds none")
	}
	return t.adopt(keys, last)
}

// adopt makes the newest of keys current (and the one before it previous).
func (t *TicketKeys) adopt(keys []pqkex.TicketKey, last jetstream.KeyValueEntry) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur := keys[len(keys)-1]
	switch {
	case t.keys == nil:
		var prev []pqkex.TicketKey
		if len(keys) > 1 && keys[len(keys)-2].ID != cur.ID {
			prev = keys[len(keys)-2 : len(keys)-1]
		}
		k, err := pqkex.NewTicketKeySet(t.period, nil, cur, prev...)
		if err != nil {
			return err
		}
		t.keys = k
	case t.keys.CurrentID() != cur.ID:
		// After missing more than one rotation, step through the bucket's previous
		// key first, so that it, not a stale key, is the one kept for the overlap.
		if len(keys) > 1 {
			if prev := keys[len(keys)-2]; prev.ID != cur.ID && prev.ID != t.keys.CurrentID() {
				if err := t.keys.Rotate(prev); err != nil {
					return err
				}
			}
		}
		if err := t.keys.Rotate(cur); err != nil {
			return err
		}
	}
	if last.Revision() >= t.revision {
		t.revision, t.created = last.Revision(), last.Created()
	}
	return nil
}

// Rotate writes a new current key unless another replica rotated since this one last
// looked; either way the replica then holds the bucket's newest key. It returns the
// current key ID.
func (t *TicketKeys) Rotate(ctx context.Context) (uint32, error) {
	t.mu.Lock()
	rev, id := t.revision, t.keys.CurrentID()
	t.mu.Unlock()
	next, err := pqkex.GenerateTicketKey(id+1, rand.Reader)
	if err != nil {
		return 0, err
	}
	cctx, cancel := t.s.ctx(ctx)
	_, err = t.kv.Update(cctx, ticketKey, encodeTicketKey(next), rev)
	cancel()
	if err != nil && !isRevisionConflict(err) {
		return 0, fmt.Errorf("natsstate: ticket keys: %w", err)
	}
	if err := t.refresh(ctx, false); err != nil {
		return 0, err
	}
	return t.keys.CurrentID(), nil
}

func isRevisionConflict(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence
}

// Run follows the bucket until ctx ends: it adopts keys written by other replicas as
// they arrive and rotates when the current key is older than the period. Errors (an
// outage) are logged and retried; the replica keeps its keys meanwhile.
func (t *TicketKeys) Run(ctx context.Context) {
	log := t.s.cfg.Logger
	tick := time.NewTicker(min(t.period/8, 15*time.Second))
	defer tick.Stop()
	var updates <-chan jetstream.KeyValueEntry
	var w jetstream.KeyWatcher
	defer func() {
		if w != nil {
			_ = w.Stop()
		}
	}()
	for {
		if w == nil {
			var err error
			if w, err = t.kv.Watch(ctx, ticketKey, jetstream.UpdatesOnly()); err != nil {
				log.Warn("natsstate: ticket keys: watch", "error", err.Error())
				w = nil
			} else {
				updates = w.Updates()
			}
		}
		select {
		case <-ctx.Done():
			return
		case e, ok := <-updates:
			if !ok {
				w, updates = nil, nil
				continue
			}
			if e != nil && e.Operation() == jetstream.KeyValuePut {
				if err := t.refresh(ctx, false); err != nil {
					log.Warn("natsstate: ticket keys: refresh", "error", err.Error())
				} else {
					log.Info("natsstate: ticket key rotated", "current_id", t.CurrentID())
				}
			}
		case <-tick.C:
			t.mu.Lock()
			age := time.Since(t.created)
			t.mu.Unlock()
			if age < t.period {
				continue
			}
			if id, err := t.Rotate(ctx); err != nil {
				log.Warn("natsstate: ticket keys: rotate", "error", err.Error())
			} else {
				log.Info("natsstate: ticket key current", "current_id", id)
			}
		}
	}
}
