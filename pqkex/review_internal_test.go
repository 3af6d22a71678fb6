package pqkex

import (
	"context"
	"encoding/binary"
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
