package pqkex

import "sync"

// inflight allocates a session's call IDs so that the server's replay window (spec 6.4)
// can never reject a legitimate call: a new ID is at most replayWindowBits past the oldest
// call whose response has not arrived yet. Once the server answers a call (any status), it
// has passed the replay check, so only unanswered calls can still arrive late; keeping them
// within the window means none arrives older than it, however many calls run at once. A
// session whose window is full is replaced by a new one (a new handshake) for further calls.
type inflight struct {
	mu    sync.Mutex
	floor uint64 // oldest unanswered ID, or next when none
	next  uint64 // next ID to hand out
	bits  [replayWindowBits / 64]uint64
}

// alloc returns the next call ID, or false when it would be replayWindowBits or more past
// the oldest unanswered call.
func (f *inflight) alloc() (uint64, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.next-f.floor >= replayWindowBits {
		return 0, false
	}
	id := f.next
	f.next++
	f.bits[(id/64)%uint64(len(f.bits))] |= 1 << (id % 64)
	return id, true
}

// full reports whether alloc would fail.
func (f *inflight) full() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.next-f.floor >= replayWindowBits
}

// done marks call id answered (or failed) and moves the floor past answered calls.
func (f *inflight) done(id uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if id < f.floor || id >= f.next {
		return
	}
	f.bits[(id/64)%uint64(len(f.bits))] &^= 1 << (id % 64)
	for f.floor < f.next && f.bits[(f.floor/64)%uint64(len(f.bits))]&(1<<(f.floor%64)) == 0 {
		f.floor++
	}
}
