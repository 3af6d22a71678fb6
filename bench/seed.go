package main

import (
	"fmt"
	"strings"
	"sync/atomic"
)

// The guide's financial-sector seed target: 12,500 requests per second at a p99 of at
// most 35 ms. The rpc suite measures Veil sealed against it at its usual 64 callers
// (the veil system) and at 256 (veil_c256, the same server and client), on this
// machine with client and server sharing its cores.
const (
	seedCallsPerS = 12500
	seedP99Ms     = 35
	seedCallers   = 256
)

// seedSystem runs the same Veil client and server as veil with seedCallers callers.
// The two share veil's stop: it runs once both systems are stopped (--only may keep
// either one alone).
func seedSystem(veil *unary) *unary {
	var stopped atomic.Int32
	stop := veil.stop
	veil.stop = func() {
		if stopped.Add(1) == 2 {
			stop()
		}
	}
	return &unary{
		sys:  newSystem("veil_c256", fmt.Sprintf("Veil, PQ sealing strict, %d callers (the seed target's second point; same server and client as veil)", seedCallers)),
		call: veil.call,
		stop: veil.stop,
		conc: seedCallers,
	}
}

// seedReport is the report's seed-target section, from the rpc suite's run.
func seedReport(reports []*Report) string {
	r := find(reports, "rpc")
	if r == nil {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## Seed target: %d requests/s at p99 <= %d ms\n\n", seedCallsPerS, seedP99Ms)
	fmt.Fprintf(&b, "The guide's financial-sector target, with Veil sealed (PQ TLS + pqkex, 1 KiB echo calls) on this %d-core machine, client and server sharing it (so each side has well under the machine; a deployment gives the server its own cores). Median of the rounds, [min-max].\n\n", r.Cores)
	b.WriteString("| Veil sealed | callers | calls/s | p99 (ms) | CPU per call (us, both sides) | meets 12,500/s | meets p99 <= 35 ms |\n|---|---|---|---|---|---|---|\n")
	yes := map[bool]string{true: "yes", false: "**no**"}
	for _, row := range []struct {
		name    string
		callers any
	}{{"veil", r.Config["concurrency"]}, {"veil_c256", seedCallers}} {
		s := r.system(row.name)
		if s == nil || len(s.samples["calls_per_s"]) == 0 {
			continue
		}
		c, p := s.Median("calls_per_s"), s.Median("p99_ms")
		clo, chi := s.Range("calls_per_s")
		plo, phi := s.Range("p99_ms")
		fmt.Fprintf(&b, "| `%s` | %v | %s [%s-%s] | %s [%s-%s] | %s | %s | %s |\n", row.name, row.callers,
			num(c), num(clo), num(chi), num(p), num(plo), num(phi), num(s.Median("cpu_us_per_call")), yes[c >= seedCallsPerS], yes[p <= seedP99Ms])
	}
	if s := r.system("veil"); s != nil {
		cpu := s.Median("cpu_us_per_call")
		fmt.Fprintf(&b, "\nAt %s us of CPU per call (client and server), 12,500 calls/s need %.2f cores for both sides together.\n", num(cpu), cpu*seedCallsPerS/1e6)
	}
	b.WriteString("\n")
	return b.String()
}

// publishedSidecarCost is Istio's own published cost of its Envoy sidecars, quoted
// beside the measured figures: published, not measured here.
const publishedSidecarCost = `## Published, not measured here: Istio's sidecar cost

For scale beside ` + "`grpc_nginx`" + ` (two proxies on the path, as in a mesh), Istio's published figures for its Envoy sidecars. These are Istio's numbers from its own load test (1,000 services, 2,000 sidecars, 70,000 mesh-wide requests/s, HTTP/1.1, 1 KB payloads, mutual TLS), on its hardware; **they were not measured by this bench**:

| Istio version | CPU per proxy | added latency, client- and server-side proxy together | source |
|---|---|---|---|
| 1.12.3 (telemetry v2, default configuration) | 0.35 vCPU per 1,000 requests/s through the proxy (350 us of CPU per request per proxy) | p90 +1.7 ms, p99 +2.7 ms over the baseline data plane | https://istio.io/v1.12/docs/ops/deployment/performance-and-scalability/ (the latency figures as also quoted for 1.12.3 in Red Hat OpenShift Service Mesh's "Additional latency" page, https://docs.redhat.com/zh-cn/documentation/openshift_container_platform/4.6/html/service_mesh/_additional-latency) |
| 1.24 | 0.20 vCPU per 1,000 requests/s (1 KB payload) for one sidecar with 2 worker threads | - | https://istio.io/docs/ops/performance-and-scalability (Performance summary for Istio 1.24) |

A call through a client-side and a server-side sidecar crosses two proxies: at Istio 1.24's figure that is about 400 us of proxy CPU per call, at 1.12.3's about 700 us, on top of the application's own (compare ` + "`cpu_us_per_call`" + ` of ` + "`veil`" + ` and ` + "`grpc_nginx`" + ` in the rpc table, which include both applications).

`
