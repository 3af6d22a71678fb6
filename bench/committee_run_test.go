package main

import (
	"testing"
)

// TestCommitteeFigures runs the committee figures of `bench he` once and checks the
// released statistics: the smudged committee release within 0.01 of the plaintext
// mean (the smudging noise over 600 records), the single key within 1e-6.
func TestCommitteeFigures(t *testing.T) {
	rep := newReport("he")
	if err := heCommittee(&config{reps: 3}, rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Systems) != 3 {
		t.Fatalf("%d systems, want the single key and two committees", len(rep.Systems))
	}
	for _, s := range rep.Systems {
		bound := 1e-2
		if s.Name == "single_key_n13" {
			bound = 1e-6
		}
		if e := s.Median("mean_abs_error"); !(e < bound) {
			t.Errorf("%s: mean error %g, want below %g", s.Name, e, bound)
		}
		for _, f := range s.Figures() {
			t.Logf("%s %s %g", s.Name, f, s.Median(f))
		}
	}
	for k, v := range rep.Ratios {
		t.Logf("ratio %s %g", k, v)
	}
}
