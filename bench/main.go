// Command bench runs Veil's side-by-side benchmarks against its peers (grpc-go,
// grpc-go behind a pair of nginx sidecars with mTLS between them,
// connect-go, raw lattigo) on loopback and prints one JSON object per suite.
//
//	go run . SUITE [flags]      SUITE: handshake, rpc, stream, he, keys, sm, h3
//	go run . all --out results/latest.json --report ../BENCHMARKS.md
//	go run . report --out results/latest.json --report ../BENCHMARKS.md   (render only)
//
// Every suite runs its systems interleaved, round by round (A B C A B C ...), and
// reports each figure's median and min-max over the rounds, plus ratios of Veil's
// figure over the peer's. Client and server run in one process, so CPU and allocation
// figures cover both sides.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"runtime/pprof"
	"strings"
	"time"
)

type config struct {
	json        bool
	verbose     bool
	reps        int
	dur         time.Duration
	warmup      time.Duration
	conc        int
	msgSize     int
	coalesceOff bool
	streamMiB   int
	handshakes  int
	presets     string
	batch       int
	features    int
	heWorkers   int
	keyMiB      int
	out         string
	report      string
	cpuprofile  string
	allocprof   string
	onlyList    string
}

func (c *config) logf(format string, args ...any) {
	if c.verbose {
		fmt.Fprintf(os.Stderr, format+"\n", args...)
	}
}

var suites = []struct {
	name string
	run  func(*config) (*Report, error)
}{
	{"handshake", handshakeSuite},
	{"rpc", rpcSuite},
	{"stream", streamSuite},
	{"he", heSuite},
	{"keys", keysSuite},
	{"sm", smSuite},
	{"h3", h3Suite},
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: bench SUITE|all|report [flags]   (SUITE: handshake, rpc, stream, he, keys, sm, h3; -h for flags)")
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 || strings.HasPrefix(os.Args[1], "-") {
		usage()
	}
	which := os.Args[1]
	if which == h3ServerCommand { // the h3 suite's server process, in its network namespace
		h3ServerMain(os.Args[2:])
		return
	}
	cfg := &config{}
	fs := flag.NewFlagSet("bench "+which, flag.ExitOnError)
	fs.BoolVar(&cfg.json, "json", false, "print each suite's JSON object on stdout (the default for a single suite)")
	fs.BoolVar(&cfg.verbose, "v", true, "log each round on stderr")
	fs.IntVar(&cfg.reps, "reps", 5, "interleaved rounds per suite")
	fs.DurationVar(&cfg.dur, "dur", time.Second, "rpc: measured time per system per round")
	fs.DurationVar(&cfg.warmup, "warmup", 500*time.Millisecond, "rpc: warm-up per system")
	fs.IntVar(&cfg.conc, "conc", 64, "rpc: concurrent callers")
	fs.IntVar(&cfg.msgSize, "msg", 1024, "rpc: request and response message bytes")
	fs.BoolVar(&cfg.coalesceOff, "compare", true, "rpc, stream: also run Veil unsealed, and (rpc) Veil with write coalescing off")
	fs.IntVar(&cfg.streamMiB, "stream-mib", 128, "stream: MiB per stream (the issue's full figure: 256)")
	fs.IntVar(&cfg.handshakes, "handshakes", 100, "handshake: handshakes per system per round")
	fs.StringVar(&cfg.presets, "presets", "n13,n14", "he: CKKS presets")
	fs.IntVar(&cfg.batch, "batch", 0, "he: samples per batch (0: all slots of one ciphertext)")
	fs.IntVar(&cfg.features, "features", 8, "he: features of the scoring model")
	fs.IntVar(&cfg.heWorkers, "he-workers", 1, "he: goroutines encrypting a batch's features, the same in every system (raw, wrapper, rpc)")
	fs.IntVar(&cfg.keyMiB, "key-mib", 0, "keys: 0 uploads the real N13 evaluation keys; n>0 pads to n MiB")
	fs.StringVar(&cfg.out, "out", "", "write all reports as a JSON array to this file")
	fs.StringVar(&cfg.report, "report", "", "write the Markdown report (and charts beside --out) to this file")
	fs.StringVar(&cfg.onlyList, "only", "", "run only these systems (comma-separated names), for profiling")
	fs.StringVar(&cfg.cpuprofile, "cpuprofile", "", "write a CPU profile of the run")
	fs.StringVar(&cfg.allocprof, "allocprofile", "", "write an allocation profile (pprof allocs) of the run")
	_ = fs.Parse(os.Args[2:])
	if which != "all" && cfg.out == "" {
		cfg.json = true
	}
	if cfg.cpuprofile != "" {
		f, err := os.Create(cfg.cpuprofile)
		if err != nil {
			fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	if which == "report" { // render the Markdown report from a saved run
		b, err := os.ReadFile(cfg.out)
		if err != nil {
			fatal(err)
		}
		var reports []*Report
		if err := json.Unmarshal(b, &reports); err != nil {
			fatal(err)
		}
		if err := writeReport(cfg.report, filepath.Dir(cfg.out), reports); err != nil {
			fatal(err)
		}
		return
	}
	var reports []*Report
	ran := false
	for _, s := range suites {
		if which != "all" && which != s.name {
			continue
		}
		ran = true
		start := time.Now()
		r, err := s.run(cfg)
		if err != nil {
			fatal(fmt.Errorf("%s: %w", s.name, err))
		}
		r.Seconds = round(time.Since(start).Seconds())
		reports = append(reports, r)
		if cfg.json {
			b, _ := json.Marshal(r)
			fmt.Println(string(b))
		}
	}
	if !ran {
		usage()
	}
	if cfg.allocprof != "" {
		if err := writeAllocProfile(cfg.allocprof); err != nil {
			fatal(err)
		}
	}
	if cfg.out != "" {
		if err := os.MkdirAll(filepath.Dir(cfg.out), 0o755); err != nil {
			fatal(err)
		}
		b, _ := json.MarshalIndent(reports, "", "  ")
		if err := os.WriteFile(cfg.out, append(b, '\n'), 0o644); err != nil {
			fatal(err)
		}
	}
	if cfg.report != "" {
		chartDir := "results"
		if cfg.out != "" {
			chartDir = filepath.Dir(cfg.out)
		}
		if err := writeReport(cfg.report, chartDir, reports); err != nil {
			fatal(err)
		}
	}
}

func fatal(err error) {
	pprof.StopCPUProfile()
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

// moduleVersion is the version of a module this binary was built with.
func moduleVersion(path string) string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	for _, m := range bi.Deps {
		if m.Path == path {
			if m.Replace != nil {
				return m.Replace.Version
			}
			return m.Version
		}
	}
	return ""
}
