package pqkex

import (
	"context"
	"sync"
	"time"
)

// replayWindowBits is the number of recent call IDs each session remembers (spec 6.4).
const replayWindowBits = 1024

// replayWindow is an anti-replay sliding window (RFC 4303 style) over call IDs.
type replayWindow struct {
	top    uint64 // highest ID seen + 1; 0 when none seen
	bits   [replayWindowBits / 64]uint64
	expiry uint64
}

// accept records id and reports whether it is fresh.
func (w *replayWindow) accept(id uint64) bool {
	if id >= w.top {
		shift := id + 1 - w.top
		if shift >= replayWindowBits {
			w.bits = [replayWindowBits / 64]uint64{}
		} else {
			for i := w.top; i <= id; i++ {
				w.clear(i)
			}
		}
		w.top = id + 1
		w.set(id)
		return true
	}
	if w.top-id > replayWindowBits {
		return false // older than the window: treated as a replay
	}
	if w.isSet(id) {
		return false
	}
	w.set(id)
	return true
}

func (w *replayWindow) set(id uint64)   { w.bits[(id/64)%uint64(len(w.bits))] |= 1 << (id % 64) }
func (w *replayWindow) clear(id uint64) { w.bits[(id/64)%uint64(len(w.bits))] &^= 1 << (id % 64) }
func (w *replayWindow) isSet(id uint64) bool {
	return w.bits[(id/64)%uint64(len(w.bits))]&(1<<(id%64)) != 0
}

// replayCache holds one window per session ID until the session's ticket expires.
type replayCache struct {
	mu      sync.Mutex
	windows map[[sessionIDSize]byte]*replayWindow
	inserts int
}

// pruneEvery bounds the cost of dropping expired windows to O(1) amortized per new session.
const pruneEvery = 1024

// accept reports whether call id of session sid is fresh at time now (Unix seconds).
func (c *replayCache) accept(sid []byte, id, expiry, now uint64) bool {
	var k [sessionIDSize]byte
	copy(k[:], sid)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.windows == nil {
		c.windows = make(map[[sessionIDSize]byte]*replayWindow)
	}
	w, ok := c.windows[k]
	if !ok {
		c.inserts++
		if c.inserts%pruneEvery == 0 {
			for key, v := range c.windows {
				if v.expiry <= now {
					delete(c.windows, key)
				}
			}
		}
		w = &replayWindow{expiry: expiry}
		c.windows[k] = w
	}
	return w.accept(id)
}

// ReplayStore is an optional anti-replay record shared by a service's replicas (spec 6.4),
// as RFC 8446 section 8 describes for TLS 0-RTT: with it, a sealed call runs at most once
// across the replicas, whether an attacker replays it to another replica (whose own window
// never saw it) or a proxy forges a session refusal after the handler ran, so that the
// client resends it under a new session. The server knows a call by its attempt (the
// client's random attempt ID and clock, sealed in the request head, bound to the client's
// SPIFFE ID), which a replay and a resend share.
//
// Accept records call, a [ReplayKeySize]-byte key, and reports whether it is the first
// record of it; it must be atomic across replicas (create if absent) and keep the record at
// least until expiry, which is never more than [ReplayRecordLifetime] ahead. An error
// refuses the call (replay_store, unavailable): a store that cannot answer must not let a
// replay through. Each Accept is a round trip to the store, so give it only the procedures
// whose side effects must not repeat ([WithReplayStore]). natsstate implements it with a
// NATS KV bucket.
type ReplayStore interface {
	Accept(ctx context.Context, call []byte, expiry time.Time) (bool, error)
}

// ReplayKeySize is the size of the keys a [ReplayStore] records.
const ReplayKeySize = 32

// AttemptWindow bounds how far a request's attempt time may be from the server's clock
// (spec 6.4): a call with a replay store whose attempt began this long ago or longer, or is
// this far ahead or further, is refused (stale_attempt). It bounds how long a proxy can hold a call (or a client's resend)
// back, and is the clock skew the two sides may have.
const AttemptWindow = 5 * time.Minute

// ReplayRecordLifetime is how long a [ReplayStore] must keep a record: past it, the
// attempt is outside [AttemptWindow] and refused by its time alone.
const ReplayRecordLifetime = 2 * AttemptWindow

// MemoryReplayStore is a ReplayStore in one process, for tests and for servers that share
// one process's memory. The zero value is ready to use.
type MemoryReplayStore struct {
	mu      sync.Mutex
	seen    map[memoryReplayKey]time.Time
	inserts int
	now     func() time.Time
}

type memoryReplayKey [ReplayKeySize]byte

// Accept implements ReplayStore.
func (m *MemoryReplayStore) Accept(_ context.Context, call []byte, expiry time.Time) (bool, error) {
	var k memoryReplayKey
	copy(k[:], call)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.seen == nil {
		m.seen = map[memoryReplayKey]time.Time{}
	}
	if _, ok := m.seen[k]; ok {
		return false, nil
	}
	// One sweep per pruneEvery new records, counted apart from the map's size (which a sweep
	// changes): O(1) amortized per call, however many records expire between sweeps.
	m.inserts++
	if m.inserts%pruneEvery == 0 {
		now := time.Now()
		if m.now != nil {
			now = m.now()
		}
		for key, exp := range m.seen {
			if !now.Before(exp) {
				delete(m.seen, key)
			}
		}
	}
	m.seen[k] = expiry
	return true, nil
}
