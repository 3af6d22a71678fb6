package main

import (
	"encoding/json"
	"math"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"
)

// Report is the JSON object one suite prints.
type Report struct {
	Suite   string             `json:"suite"`
	Go      string             `json:"go"`
	CPU     string             `json:"cpu"`
	Cores   int                `json:"cores"`
	Config  map[string]any     `json:"config"`
	Systems []*System          `json:"systems"`
	Ratios  map[string]float64 `json:"ratios"`
	// RatioRange is the min-max of each ratio over the interleaved rounds (round i of
	// one system over round i of the other), the noise figure for the ratio.
	RatioRange map[string][2]float64 `json:"ratio_range,omitempty"`
	Notes      []string              `json:"notes,omitempty"`
	Seconds    float64               `json:"seconds"`
	Veil       string                `json:"veil"` // git describe of the tree measured
	Date       string                `json:"date"` // when the suite ran, UTC
}

// System is one compared system: the median of every figure over the repetitions,
// and each figure's min-max under "range".
type System struct {
	Name    string
	Label   string
	samples map[string][]float64
	order   []string
}

func newSystem(name, label string) *System {
	return &System{Name: name, Label: label, samples: map[string][]float64{}}
}

// add records one repetition's value of figure.
func (s *System) add(figure string, v float64) {
	if _, ok := s.samples[figure]; !ok {
		s.order = append(s.order, figure)
	}
	s.samples[figure] = append(s.samples[figure], v)
}

// Median returns the median of figure over the repetitions (NaN if none).
func (s *System) Median(figure string) float64 { return median(s.samples[figure]) }

// Range returns figure's min and max over the repetitions.
func (s *System) Range(figure string) (float64, float64) {
	v := s.samples[figure]
	if len(v) == 0 {
		return math.NaN(), math.NaN()
	}
	return slices.Min(v), slices.Max(v)
}

// Figures returns the figure names in the order they were first recorded.
func (s *System) Figures() []string { return s.order }

func (s *System) MarshalJSON() ([]byte, error) {
	m := map[string]any{"system": s.Name, "label": s.Label}
	rng := map[string][2]float64{}
	reps := 0
	for _, f := range s.order {
		m[f] = round(s.Median(f))
		lo, hi := s.Range(f)
		rng[f] = [2]float64{round(lo), round(hi)}
		reps = max(reps, len(s.samples[f]))
	}
	m["range"] = rng
	m["reps"] = reps
	m["figures"] = s.order
	return json.Marshal(m)
}

func (s *System) UnmarshalJSON(b []byte) error {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return err
	}
	*s = *newSystem("", "")
	_ = json.Unmarshal(m["system"], &s.Name)
	_ = json.Unmarshal(m["label"], &s.Label)
	var rng map[string][2]float64
	_ = json.Unmarshal(m["range"], &rng)
	// The figures in the order they were recorded (sorted for reports without it).
	var keys []string
	if json.Unmarshal(m["figures"], &keys) != nil || len(keys) == 0 {
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
	}
	for _, k := range keys {
		if k == "system" || k == "label" || k == "range" || k == "reps" || k == "figures" {
			continue
		}
		var v float64
		if json.Unmarshal(m[k], &v) != nil {
			continue
		}
		r, ok := rng[k]
		if !ok {
			r = [2]float64{v, v}
		}
		s.add(k, r[0])
		s.add(k, v)
		s.add(k, r[1])
	}
	return nil
}

// round keeps six significant digits: plenty for noisy figures, exact for byte counts
// below a million.
func round(v float64) float64 {
	if v == 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return v
	}
	d := math.Ceil(math.Log10(math.Abs(v)))
	p := math.Pow(10, 6-d)
	return math.Round(v*p) / p
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	c := slices.Clone(v)
	slices.Sort(c)
	n := len(c)
	if n%2 == 1 {
		return c[n/2]
	}
	return (c[n/2-1] + c[n/2]) / 2
}

// percentile returns the p-th percentile (0..100) of sorted durations, in milliseconds.
func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	i = min(max(i, 0), len(sorted)-1)
	return float64(sorted[i]) / float64(time.Millisecond)
}

func newReport(suite string) *Report {
	return &Report{
		Suite: suite, Go: runtime.Version(), CPU: cpuModel(), Cores: runtime.NumCPU(),
		Config: map[string]any{}, Ratios: map[string]float64{}, RatioRange: map[string][2]float64{},
		Veil: gitCommit(), Date: time.Now().UTC().Format("2006-01-02 15:04 UTC"),
	}
}

// ratio records num's figure over den's figure (medians), and the min-max of the same
// ratio taken round by round.
func (r *Report) ratio(name string, num *System, numFig string, den *System, denFig string) {
	if num == nil || den == nil { // left out with --only
		return
	}
	r.Ratios[name] = round(num.Median(numFig) / den.Median(denFig))
	a, b := num.samples[numFig], den.samples[denFig]
	lo, hi := math.Inf(1), math.Inf(-1)
	for i := range min(len(a), len(b)) {
		q := a[i] / b[i]
		lo, hi = min(lo, q), max(hi, q)
	}
	if !math.IsInf(lo, 0) {
		r.RatioRange[name] = [2]float64{round(lo), round(hi)}
	}
}

func (r *Report) system(name string) *System {
	for _, s := range r.Systems {
		if s.Name == name {
			return s
		}
	}
	return nil
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}

// meter measures the process's CPU time and allocations over an interval: client and
// server run in this process, so the figures are both sides together.
type meter struct {
	start   time.Time
	cpu     time.Duration
	mallocs uint64
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func startMeter() meter {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return meter{start: time.Now(), cpu: cpuTime(), mallocs: ms.Mallocs}
}

// stop returns the wall time, CPU time and allocations since start.
func (m meter) stop() (wall, cpu time.Duration, mallocs uint64) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return time.Since(m.start), cpuTime() - m.cpu, ms.Mallocs - m.mallocs
}
