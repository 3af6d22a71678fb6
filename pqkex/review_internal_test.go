package pqkex

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"testing"
	"time"
)

// TestMemoryReplayStorePruneIsAmortized: MemoryReplayStore drops expired records in one
// sweep every pruneEvery new records, so a sweep's cost (every record held) is spread over
// as many calls. Under steady traffic, where about one record expires per new one, the
// sweep used to run whenever the store's size hit pruneEvery-1 modulo pruneEvery, which it
// does again after each sweep that removed one record: a sweep of all records on every
// call, under the store's lock. The test counts sweeps by the clock reads they make.
func TestMemoryReplayStorePruneIsAmortized(t *testing.T) {
	base := time.Unix(1_000_000, 0)
	var now time.Time
	sweeps := 0
	m := &MemoryReplayStore{now: func() time.Time { sweeps++; return now }}
	const live, calls = 4*pruneEvery - 1, 20 * pruneEvery
	for i := range calls {
		// Record i lives until base+i+live seconds; the clock is at base+i: the records of
		// the last `live` calls are alive, one expires per call.
		now = base.Add(time.Duration(i) * time.Second)
		var key [ReplayKeySize]byte
		binary.BigEndian.PutUint64(key[:], uint64(i))
		fresh, err := m.Accept(context.Background(), key[:], now.Add(live*time.Second))
		if err != nil || !fresh {
			t.Fatalf("call %d: fresh %v, %v", i, fresh, err)
		}
	}
	if max := calls/pruneEvery + 1; sweeps > max {
		t.Fatalf("%d sweeps of the whole store for %d calls, want at most %d", sweeps, calls, max)
	}
	if n := len(m.seen); n > live+pruneEvery {
		t.Fatalf("%d records held, want at most %d (the live ones and one sweep's worth)", n, live+pruneEvery)
	}
}

// TestAttemptKeyIndependently recomputes the replay store's key from spec 6.4's text
// (SHA-256 of the label, 0x00, the client's SPIFFE ID, 0x00 and the 24 attempt bytes) and
// checks what the key must separate: one attempt named by two clients gives two keys (a
// client cannot claim, or block, another's attempt), and an attempt in another spelling
// (upper-case hex) or of another length is malformed, not a second name for the same key.
func TestAttemptKeyIndependently(t *testing.T) {
	attempt := "000102030405060708090a0b0c0d0e0f" + "000000006a3b1f00"
	raw, err := hex.DecodeString(attempt)
	if err != nil {
		t.Fatal(err)
	}
	spec := func(client string) [32]byte {
		msg := append([]byte("veil-pqkex v2 attempt\x00"+client+"\x00"), raw...)
		return sha256.Sum256(msg)
	}
	const alice, bob = "spiffe://example.org/alice", "spiffe://example.org/bob"
	ka, began, err := attemptKey(alice, attempt)
	if err != nil || ka != spec(alice) || !began.Equal(time.Unix(0x6a3b1f00, 0)) {
		t.Fatalf("key %x began %v (%v); want %x and %v", ka, began, err, spec(alice), time.Unix(0x6a3b1f00, 0))
	}
	kb, _, err := attemptKey(bob, attempt)
	if err != nil || kb != spec(bob) || kb == ka {
		t.Fatalf("another client's key for the same attempt: %x (%v)", kb, err)
	}
	// (SPIFFE IDs hold no NUL and the attempt is fixed-length and last: no two (ID, attempt)
	// pairs share an input.) attemptKey checks the one spelling itself, so it neither
	// panics on a longer value (hex.Decode would) nor gives one record two names.
	for _, bad := range []string{strings.ToUpper(attempt), attempt[:46], attempt + "00", "zz" + attempt[2:]} {
		if _, _, err := attemptKey(alice, bad); err == nil {
			t.Errorf("attempt %q accepted", bad)
		}
	}
	// A time past int64 seconds is stale, not a wrapped time in the window.
	if _, _, err := attemptKey(alice, attempt[:32]+"ffffffffffffffff"); err != errAttemptStale {
		t.Errorf("attempt time 2^64-1: %v, want stale", err)
	}
}
