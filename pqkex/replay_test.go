package pqkex

import "testing"

func TestReplayWindow(t *testing.T) {
	var w replayWindow
	steps := []struct {
		id   uint64
		want bool
	}{
		{0, true}, {0, false}, {2, true}, {1, true}, {1, false}, {2, false},
		{1500, true}, {1499, true}, {1499, false},
		{1500 - replayWindowBits + 1, true}, // the oldest ID still inside the window
		{1500 - replayWindowBits, false},    // just outside: treated as a replay
		{3, false},
		{5000, true}, {1500, false}, {4999, true}, {4000, true}, {4000, false},
	}
	for i, s := range steps {
		if got := w.accept(s.id); got != s.want {
			t.Fatalf("step %d: accept(%d) = %v, want %v", i, s.id, got, s.want)
		}
	}
}

func TestReplayCacheSeparatesSessionsAndPrunes(t *testing.T) {
	var c replayCache
	a, b := make([]byte, sessionIDSize), make([]byte, sessionIDSize)
	b[0] = 1
	if !c.accept(a, 7, 100, 50) || !c.accept(b, 7, 100, 50) {
		t.Fatal("same call ID in two sessions refused")
	}
	if c.accept(a, 7, 100, 50) {
		t.Fatal("replay accepted")
	}
	// Expired windows are pruned as new sessions arrive.
	for i := range pruneEvery {
		sid := make([]byte, sessionIDSize)
		sid[1], sid[2] = byte(i), byte(i>>8)
		c.accept(sid, 0, 1000, 200)
	}
	if _, ok := c.windows[[sessionIDSize]byte(a)]; ok {
		t.Fatal("expired window not pruned")
	}
}
