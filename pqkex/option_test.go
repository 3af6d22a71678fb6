package pqkex

import (
	"testing"
	"time"
)

func TestModeZeroIsStrict(t *testing.T) {
	var m Mode
	if m != Strict {
		t.Fatalf("zero Mode is %v, want strict", m)
	}
	for _, s := range []string{"strict", "permissive"} {
		m, err := ParseMode(s)
		if err != nil || m.String() != s {
			t.Errorf("ParseMode(%q) = %v, %v", s, m, err)
		}
	}
	if m, err := ParseMode(""); err != nil || m != Strict {
		t.Errorf(`ParseMode("") = %v, %v; want strict`, m, err)
	}
	for _, s := range []string{"on", "off", "Strict", "none"} {
		if _, err := ParseMode(s); err == nil {
			t.Errorf("ParseMode(%q) accepted", s)
		}
	}
}

// TestRekeyPolicyZeroIsDefaultNegativeIsNever holds RekeyPolicy and StreamRekeyPolicy to
// their one documented rule: zero takes the default, negative is never.
func TestRekeyPolicyZeroIsDefaultNegativeIsNever(t *testing.T) {
	if got := (RekeyPolicy{}).withDefaults(); got != DefaultRekeyPolicy() {
		t.Fatalf("zero policy resolves to %+v, want the defaults %+v", got, DefaultRekeyPolicy())
	}
	never := RekeyPolicy{Calls: -1, Bytes: -1, Age: -1, Stream: StreamRekeyPolicy{Bytes: -1, Age: -1}}.withDefaults()
	if never != (RekeyPolicy{}) {
		t.Fatalf("negative policy resolves to %+v, want all never (0)", never)
	}
	clock := time.Unix(0, 0)
	due := func(p StreamRekeyPolicy, bytes int64, age time.Duration) bool {
		s := &sealer{side: &clientCall{}, policy: RekeyPolicy{Stream: p}.withDefaults().Stream, now: func() time.Time { return clock }}
		s.rekeyDue() // starts the age clock
		s.sinceBytes = bytes
		clock = clock.Add(age)
		return s.rekeyDue()
	}
	d := DefaultRekeyPolicy().Stream
	for _, tc := range []struct {
		name  string
		p     StreamRekeyPolicy
		bytes int64
		age   time.Duration
		want  bool
	}{
		{"zero, default bytes reached", StreamRekeyPolicy{}, d.Bytes, 0, true},
		{"zero, default age reached", StreamRekeyPolicy{}, 0, d.Age, true},
		{"zero, below the defaults", StreamRekeyPolicy{}, d.Bytes - 1, d.Age - time.Second, false},
		{"negative, far past the defaults", StreamRekeyPolicy{Bytes: -1, Age: -1}, 1 << 50, 1000 * time.Hour, false},
		{"negative bytes, age set", StreamRekeyPolicy{Bytes: -1, Age: time.Minute}, 1 << 50, time.Minute, true},
		{"set bytes", StreamRekeyPolicy{Bytes: 100}, 100, 0, true},
	} {
		if got := due(tc.p, tc.bytes, tc.age); got != tc.want {
			t.Errorf("%s: rekey due %v, want %v", tc.name, got, tc.want)
		}
	}
}
