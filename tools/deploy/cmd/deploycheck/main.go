// Command deploycheck renders the Veil Helm chart for every scenario
// (deploycheck.Scenarios), lints it, decodes every object strictly and checks the
// chart's defaults; it writes each rendering and each serve.yaml under -out, for
// `veil serve --check`. Run by `make deploy-check`.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/veilrpc/veil/tools/deploy/deploycheck"
)

func main() {
	chart := flag.String("chart", "../../deploy/helm/veil", "the chart's directory")
	out := flag.String("out", "", "write renderings and serve.yaml files under this directory")
	helmCmd := flag.String("helm", "go tool helm", "command that runs helm (split on spaces)")
	kube := flag.String("kube-version", "1.33.0", "Kubernetes version to render for")
	testdata := flag.String("testdata", "deploycheck/testdata", "directory of --set-file inputs")
	flag.Parse()
	h, err := deploycheck.Helm{Command: strings.Fields(*helmCmd), KubeVersion: *kube, Testdata: *testdata}.Resolve()
	if err != nil {
		fmt.Fprintln(os.Stderr, "deploycheck:", err)
		os.Exit(1)
	}
	fmt.Printf("helm: %s\n", strings.Join(h.Command, " "))
	failed := 0
	for _, s := range deploycheck.Scenarios() {
		start := time.Now()
		n, cfgs, err := run(h, *chart, *out, s)
		if err != nil {
			failed++
			fmt.Fprintf(os.Stderr, "FAIL %s:\n  %s\n", s.Name, strings.ReplaceAll(err.Error(), "\n", "\n  "))
			continue
		}
		fmt.Printf("ok   %-26s %2d objects, %d serve.yaml (%.1fs)\n", s.Name, n, cfgs, time.Since(start).Seconds())
	}
	if failed > 0 {
		fmt.Fprintf(os.Stderr, "deploycheck: %d of %d scenarios failed\n", failed, len(deploycheck.Scenarios()))
		os.Exit(1)
	}
}

func run(h deploycheck.Helm, chart, out string, s deploycheck.Scenario) (int, int, error) {
	if err := h.Lint(chart, s); err != nil {
		return 0, 0, err
	}
	manifest, err := h.Template(chart, s)
	if err != nil {
		return 0, 0, err
	}
	if out != "" {
		if err := os.MkdirAll(filepath.Join(out, s.Name), 0o755); err != nil {
			return 0, 0, err
		}
		if err := os.WriteFile(filepath.Join(out, s.Name+".yaml"), manifest, 0o644); err != nil {
			return 0, 0, err
		}
	}
	objs, err := deploycheck.Decode(manifest)
	if err != nil {
		return 0, 0, err
	}
	cfgs, err := deploycheck.Check(objs, s.Expect)
	if err != nil {
		return 0, 0, err
	}
	if out != "" {
		for _, c := range cfgs {
			if err := os.WriteFile(filepath.Join(out, s.Name, c.Deployment+".serve.yaml"), c.Data, 0o644); err != nil {
				return 0, 0, err
			}
		}
	}
	return len(objs), len(cfgs), nil
}
