package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"

	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
)

// crossoverSizes are the message sizes at which the rpc suite also runs Veil sealed and
// unsealed (interleaved, round by round) to find the size from which sealing costs at
// most 5% of throughput. 1 KiB is the main table's size; the echo service validates
// messages to at most 4 KiB, so larger unary sizes are not reachable here: the stream
// suite's sealed_vs_unsealed_mb_per_s is the large-message point (64 KiB messages).
var crossoverSizes = []int{2 << 10, 4 << 10}

// crossoverBound is the sealed/unsealed calls/s ratio the crossover size reaches.
const crossoverBound = 0.95

type crossover struct {
	sizes  []int
	sealed []*System
	plain  []*System
}

// crossoverSweep runs the sweep when both clients exist (not with --only or --compare=false).
func crossoverSweep(cfg *config, sealed, plain echov1connect.EchoServiceClient) (*crossover, error) {
	c := &crossover{}
	// With --only, both must be selected: selected() stops the servers of the others.
	if only := strings.Split(cfg.onlyList, ","); sealed == nil || plain == nil ||
		(cfg.onlyList != "" && (!slices.Contains(only, "veil") || !slices.Contains(only, "veil_unsealed"))) {
		return c, nil
	}
	d := cfg.dur
	for _, n := range crossoverSizes {
		msg := strings.Repeat("v", n)
		s := newSystem(fmt.Sprintf("veil_%dk", n>>10), fmt.Sprintf("Veil sealed, %d KiB", n>>10))
		p := newSystem(fmt.Sprintf("veil_unsealed_%dk", n>>10), fmt.Sprintf("Veil unsealed, %d KiB", n>>10))
		calls := []func(r unaryResult){
			func(r unaryResult) { s.add("calls_per_s", r.callsPerS); s.add("cpu_us_per_call", r.cpuPerCall) },
			func(r unaryResult) { p.add("calls_per_s", r.callsPerS); p.add("cpu_us_per_call", r.cpuPerCall) },
		}
		for _, cl := range []echov1connect.EchoServiceClient{sealed, plain} {
			if _, err := runUnary(connectCall(cl, msg), cfg.conc, cfg.warmup/2); err != nil {
				return nil, err
			}
		}
		for range cfg.reps {
			for i, cl := range []echov1connect.EchoServiceClient{sealed, plain} {
				runtime.GC()
				r, err := runUnary(connectCall(cl, msg), cfg.conc, d)
				if err != nil {
					return nil, fmt.Errorf("crossover %d bytes: %w", n, err)
				}
				calls[i](r)
			}
		}
		cfg.logf("rpc crossover %6d B sealed %8.0f calls/s unsealed %8.0f calls/s", n, s.Median("calls_per_s"), p.Median("calls_per_s"))
		c.sizes = append(c.sizes, n)
		c.sealed = append(c.sealed, s)
		c.plain = append(c.plain, p)
	}
	return c, nil
}

// record adds the sweep's ratios to the rpc report and a note naming the crossover size.
func (c *crossover) record(rep *Report) {
	if len(c.sizes) == 0 {
		return
	}
	first := 0
	for i, n := range c.sizes {
		rep.ratio(fmt.Sprintf("sealed_vs_unsealed_calls_per_s_%dk", n>>10), c.sealed[i], "calls_per_s", c.plain[i], "calls_per_s")
		rep.ratio(fmt.Sprintf("sealed_vs_unsealed_cpu_per_call_%dk", n>>10), c.sealed[i], "cpu_us_per_call", c.plain[i], "cpu_us_per_call")
		if rep.Ratios[fmt.Sprintf("sealed_vs_unsealed_calls_per_s_%dk", n>>10)] >= crossoverBound && first == 0 {
			first = n
		}
	}
	if first == 0 {
		rep.Notes = append(rep.Notes, fmt.Sprintf("crossover: sealed/unsealed calls/s stayed below %.2f at every unary size up to %d KiB (the echo service's limit); the stream suite's sealed_vs_unsealed_mb_per_s is the 64 KiB-message point", crossoverBound, c.sizes[len(c.sizes)-1]>>10))
		return
	}
	rep.Config["crossover_bytes"] = first
	rep.Notes = append(rep.Notes, fmt.Sprintf("crossover: from %d KiB on (sizes tried: 1, %s KiB), sealed/unsealed calls/s is >= %.2f (ratios sealed_vs_unsealed_calls_per_s_<size>k)", first>>10, sizesKiB(c.sizes), crossoverBound))
}

func sizesKiB(s []int) string {
	var b []string
	for _, n := range s {
		b = append(b, fmt.Sprint(n>>10))
	}
	return strings.Join(b, ", ")
}

// writeAllocProfile writes the allocations made so far (pprof's allocs profile).
func writeAllocProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return pprof.Lookup("allocs").WriteTo(f, 0)
}
