package main

import (
	"cmp"
	"fmt"
	"image/color"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// target is one of the goals, checked against a ratio.
type target struct {
	suite, ratio string
	atMost       bool
	bound        float64
	goal         string
}

var targets = []target{
	{"rpc", "veil_vs_grpc_calls_per_s", false, 1.0, "Veil sealed calls/s >= 1.0x grpc-go"},
	{"rpc", "veil_vs_connect_calls_per_s", false, 0.95, "Veil sealed calls/s >= 0.95x connect-go (unsealed)"},
	{"rpc", "veil_vs_grpc_p99", true, 2.0, "Veil sealed p99 <= 2.0x grpc-go"},
	{"rpc", "sealed_vs_unsealed_calls_per_s", false, 0.90, "Veil sealed calls/s >= 0.90x the same server unsealed (1 KiB)"},
	{"rpc", "veil_vs_grpc_cpu_per_call", true, 1.8, "Veil sealed CPU per call <= 1.8x grpc-go"},
	{"rpc", "veil_vs_sidecar_calls_per_s", false, 1.0, "Veil sealed calls/s >= grpc-go behind two nginx sidecars"},
	{"rpc", "veil_vs_sidecar_p99", true, 1.0, "Veil sealed p99 <= grpc-go behind two nginx sidecars"},
	{"rpc", "veil_vs_sidecar_cpu_per_call", true, 1.0, "Veil sealed CPU per call <= grpc-go behind two nginx sidecars (nginx counted)"},
	{"handshake", "setup_vs_pqtls_cpu_per_handshake", true, 1.15, "Veil session setup (PQ TLS + pqkex, both sides) CPU <= 1.15x PQ TLS alone"},
	{"stream", "veil_vs_connect_mb_per_s", false, 0.9, "Veil sealed stream MB/s >= 0.9x connect-go (unsealed)"},
	{"he", "rpc_vs_raw_ms_per_batch_n13", true, 1.25, "HE end to end over RPC <= 1.25x raw lattigo (N13)"},
	{"he", "rpc_vs_raw_ms_per_batch_n14", true, 1.25, "HE end to end over RPC <= 1.25x raw lattigo (N14)"},
	{"he", "wrapper_vs_raw_ms_per_batch_n13", true, 1.05, "he wrapper <= 1.05x raw lattigo (N13)"},
	{"he", "wrapper_vs_raw_ms_per_batch_n14", true, 1.05, "he wrapper <= 1.05x raw lattigo (N14)"},
	{"he", "wire_vs_raw_bytes_n13", true, 1.05, "wire bytes <= 1.05x raw ciphertext bytes (N13)"},
	{"he", "wire_vs_raw_bytes_n14", true, 1.05, "wire bytes <= 1.05x raw ciphertext bytes (N14)"},
}

// charts per suite: figure, y-axis label.
var charts = map[string][][2]string{
	"rpc":       {{"calls_per_s", "calls/s"}, {"p50_ms", "p50 latency (ms)"}, {"p99_ms", "p99 latency (ms)"}, {"cpu_us_per_call", "CPU per call (us, client+server)"}},
	"handshake": {{"cpu_us_per_handshake", "CPU per setup (us, client+server)"}, {"handshakes_per_s", "setups/s"}},
	"stream":    {{"mb_per_s", "MB/s"}},
	"he":        {{"ms_per_batch", "ms per batch"}},
	"keys":      {{"upload_mb_per_s", "upload MB/s"}},
	"sm":        {{"cpu_us_per_handshake", "CPU per pqkex handshake (us)"}, {"cpu_us_per_call", "CPU per sealed call (us)"}, {"mb_per_s", "sealed stream MB/s"}},
}

// writeReport writes the Markdown report to path and its charts (PNG) into chartDir.
func writeReport(path, chartDir string, reports []*Report) error {
	if err := os.MkdirAll(chartDir, 0o755); err != nil {
		return err
	}
	rel := chartDir
	if absReport, err := filepath.Abs(filepath.Dir(path)); err == nil {
		if absCharts, err := filepath.Abs(chartDir); err == nil {
			if r, err := filepath.Rel(absReport, absCharts); err == nil {
				rel = r
			}
		}
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("# Veil benchmarks\n\n")
	date, commit := time.Now().UTC().Format("2006-01-02 15:04 UTC"), gitCommit()
	if len(reports) > 0 && reports[0].Veil != "" {
		date, commit = reports[0].Date, reports[0].Veil
	}
	w("Written by `make bench` (`cd bench && go run . all --out results/latest.json --report ../BENCHMARKS.md`), run on %s.\n", date)
	w("Raw figures: [`%[1]s/latest.json`](%[1]s/latest.json). One suite alone: `cd bench && go run . SUITE` (handshake, rpc, stream, he, keys, sm, h3) prints its JSON object.\n\n", filepath.ToSlash(rel))
	if len(reports) > 0 {
		r := reports[0]
		w("**Machine:** %s, %d cores (shared with other work: absolute figures are noisy, compare ratios from one run). **Go** %s. ", r.CPU, r.Cores, r.Go)
	}
	w("**Peers:** grpc-go %s, connect-go %s, lattigo %s. **Veil** commit %s.\n\n",
		moduleVersion("google.golang.org/grpc"), moduleVersion("connectrpc.com/connect"), moduleVersion("github.com/tuneinsight/lattigo/v5"), commit)
	w("Method: client and server run in one process over loopback; every suite interleaves its systems round by round (A B C A B C ...) and reports the median of the rounds with the min-max range in brackets. CPU is the process's (both sides) from getrusage; allocations from runtime.MemStats. Ratios are Veil's median over the peer's; the range beside a ratio is the min-max of the same ratio taken round by round.\n\n")

	w("## Targets\n\n| goal | ratio | measured (range) | met |\n|---|---|---|---|\n")
	for _, t := range targets {
		r := find(reports, t.suite)
		if r == nil {
			w("| %s | `%s` | not run | - |\n", t.goal, t.ratio)
			continue
		}
		v, ok := r.Ratios[t.ratio]
		if !ok {
			w("| %s | `%s` | not measured | - |\n", t.goal, t.ratio)
			continue
		}
		met := v >= t.bound
		if t.atMost {
			met = v <= t.bound
		}
		w("| %s | `%s` | %s %s | %s |\n", t.goal, t.ratio, num(v), rangeOf(r, t.ratio), map[bool]string{true: "yes", false: "**no**"}[met])
	}
	w("\nThe same comparisons in CPU per operation (client and server together), which contention on a shared machine disturbs much less than throughput: lower is better, Veil's figure over the peer's.\n\n| suite | ratio | median (range) |\n|---|---|---|\n")
	for _, r := range reports {
		for _, k := range slices.Sorted(mapKeys(r.Ratios)) {
			if strings.Contains(k, "cpu") {
				w("| %s | `%s` | %s %s |\n", r.Suite, k, num(r.Ratios[k]), rangeOf(r, k))
			}
		}
	}
	w("\n")

	w("%s", seedReport(reports))
	w("%s", publishedSidecarCost)
	for _, r := range reports {
		w("## %s\n\n", r.Suite)
		keys := slices.Sorted(mapKeys(r.Config))
		for _, k := range keys {
			w("- %s: %v\n", k, r.Config[k])
		}
		w("- wall time of the suite: %.0f s\n\n", r.Seconds)
		var figs []string
		for _, s := range r.Systems {
			for _, f := range s.Figures() {
				if !slices.Contains(figs, f) {
					figs = append(figs, f)
				}
			}
		}
		w("| system | %s |\n|---|%s\n", strings.Join(figs, " | "), strings.Repeat("---|", len(figs)))
		for _, s := range r.Systems {
			w("| **%s**: %s |", s.Name, s.Label)
			for _, f := range figs {
				if len(s.samples[f]) == 0 {
					w(" - |")
					continue
				}
				lo, hi := s.Range(f)
				w(" %s [%s-%s] |", num(s.Median(f)), num(lo), num(hi))
			}
			w("\n")
		}
		w("\n| ratio | median | round-by-round range |\n|---|---|---|\n")
		for _, k := range slices.Sorted(mapKeys(r.Ratios)) {
			w("| `%s` | %s | %s |\n", k, num(r.Ratios[k]), strings.Trim(rangeOf(r, k), "()"))
		}
		w("\n")
		for _, n := range r.Notes {
			w("Note: %s\n\n", n)
		}
		if extra := extraCharts[r.Suite]; extra != nil {
			if err := extra(chartDir, rel, r, w); err != nil {
				return err
			}
		}
		for _, c := range charts[r.Suite] {
			name := r.Suite + "_" + c[0] + ".png"
			if err := barChart(filepath.Join(chartDir, name), r.Suite+": "+c[1]+" (median, bars: min-max)", c[1], r.Systems, c[0]); err != nil {
				return err
			}
			w("![%s %s](%s)\n", r.Suite, c[0], filepath.ToSlash(filepath.Join(rel, name)))
		}
		w("\n")
	}
	if a, err := os.ReadFile(filepath.Join(filepath.Dir(chartDir), "analysis.md")); err == nil {
		w("%s", a)
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

func find(reports []*Report, suite string) *Report {
	for _, r := range reports {
		if r.Suite == suite {
			return r
		}
	}
	return nil
}

func rangeOf(r *Report, ratio string) string {
	if rr, ok := r.RatioRange[ratio]; ok {
		return fmt.Sprintf("(%s-%s)", num(rr[0]), num(rr[1]))
	}
	return ""
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// num prints a figure with three significant digits, without exponent for the usual
// magnitudes.
func num(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "-"
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.1f", v)
	case a >= 10:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

func gitCommit() string {
	// "-dirty": the working tree had uncommitted changes (other engineers' work in
	// progress is built in too).
	out, err := exec.Command("git", "describe", "--always", "--dirty").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// barChart draws one bar per system that has figure, at its median, with a min-max
// error bar.
func barChart(path, title, ylabel string, systems []*System, figure string) error {
	var vals plotter.Values
	var names []string
	var errs plotter.YErrors
	var xys plotter.XYs
	for _, s := range systems {
		if len(s.samples[figure]) == 0 {
			continue
		}
		m := s.Median(figure)
		lo, hi := s.Range(figure)
		vals = append(vals, m)
		names = append(names, s.Name)
		errs = append(errs, struct{ Low, High float64 }{m - lo, hi - m})
		xys = append(xys, plotter.XY{X: float64(len(xys)), Y: m})
	}
	if len(vals) == 0 {
		return nil
	}
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Y.Min = 0
	bars, err := plotter.NewBarChart(vals, vg.Points(36))
	if err != nil {
		return err
	}
	bars.Color = color.RGBA{R: 70, G: 110, B: 170, A: 255}
	bars.LineStyle.Width = 0
	p.Add(bars)
	eb, err := plotter.NewYErrorBars(errorBars{xys, errs})
	if err != nil {
		return err
	}
	eb.LineStyle.Width = vg.Points(1.2)
	p.Add(eb)
	p.NominalX(names...)
	p.X.Tick.Label.Rotation = 0.35
	p.X.Tick.Label.XAlign = -0.8
	p.X.Tick.Label.YAlign = -0.5
	width := vg.Length(cmp.Or(max(len(vals)*90, 420), 420))
	return p.Save(width, 300, path)
}

type errorBars struct {
	plotter.XYs
	plotter.YErrors
}
