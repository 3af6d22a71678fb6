package deploycheck

import (
	"bytes"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
)

// Scenario is one rendering of the chart: helm --set and --set-file values, and what
// they must produce.
type Scenario struct {
	Name    string
	Set     []string
	SetFile []string // paths relative to the testdata directory
	Expect  Expect
}

// Scenarios covers every identity mode, the state backend nats on and off, the
// SPIRE socket from the CSI driver and from a hostPath, a CA outside the release,
// egress restricted to a region, and continuous authentication (the token service and
// --require-token) with the public key rendered by the chart or brought along.
func Scenarios() []Scenario {
	return []Scenario{
		{Name: "veil-ca", Expect: Expect{Mode: "veil-ca"}},
		{Name: "veil-ca-nats",
			Set:     []string{"state.backend=nats", "state.url=tls://nats.nats.svc:4222", "state.caSecret=nats-ca"},
			SetFile: []string{"identity.veilCA.bundle=bundle.crt", "scoring.model.json=model.json"},
			Expect:  Expect{Mode: "veil-ca", NATS: true}},
		{Name: "veil-ca-external-region",
			Set: []string{"ca.enabled=false", "identity.veilCA.url=https://ca.example.org:8440",
				"networkPolicy.egressRegion.enabled=true", "networkPolicy.egressRegion.name=eu",
				"networkPolicy.egressRegion.allowedCIDRs={10.0.0.0/8,192.0.2.0/24}"},
			Expect: Expect{Mode: "veil-ca", Region: true}},
		{Name: "spire",
			Set:    []string{"identity.mode=spire", "identity.spire.clusterSPIFFEID.enabled=true", "identity.spire.clusterSPIFFEID.className=spire-mgmt"},
			Expect: Expect{Mode: "spire", ClusterSPIFFEID: true}},
		{Name: "spire-hostpath-nats",
			Set:    []string{"identity.mode=spire", "identity.spire.socketVolume=hostPath", "state.backend=nats", "ca.enabled=false"},
			Expect: Expect{Mode: "spire", HostPath: true, NATS: true}},
		{Name: "cert-manager",
			Set:    []string{"identity.mode=cert-manager"},
			Expect: Expect{Mode: "cert-manager"}},
		{Name: "cert-manager-nats-region",
			Set: []string{"identity.mode=cert-manager", "state.backend=nats", "state.replicas=5",
				"networkPolicy.egressRegion.enabled=true", "networkPolicy.egressRegion.allowedCIDRs={10.20.0.0/16}",
				"networkPolicy.extraEgress[0].to[0].ipBlock.cidr=10.20.30.0/24", "networkPolicy.extraEgress[0].ports[0].port=443",
				"scoring.spiffeID=spiffe://example.org/scoring", "identity.certManager.issuerRef.kind=Issuer"},
			Expect: Expect{Mode: "cert-manager", NATS: true, Region: true}},
		{Name: "spire-nats-tokens",
			Set:     []string{"identity.mode=spire", "state.backend=nats", "auth.enabled=true", "auth.tokenTTL=2m"},
			SetFile: []string{"auth.publicKey.pem=auth.key.pub"},
			Expect:  Expect{Mode: "spire", NATS: true, Tokens: true}},
		{Name: "veil-ca-tokens",
			Set:    []string{"auth.enabled=true", "auth.publicKey.configMap=veil-token-public-key", "auth.signingKey.secret=veil-token-signing-key"},
			Expect: Expect{Mode: "veil-ca", Tokens: true}},
		{Name: "spire-http3",
			Set:    []string{"identity.mode=spire", "http3.enabled=true", "scoring.ingressFrom[0].podSelector.matchLabels.role=client"},
			Expect: Expect{Mode: "spire", HTTP3: true}},
	}
}

// Helm runs helm: argv[0:] is the command that starts it (go tool helm).
type Helm struct {
	Command     []string
	KubeVersion string
	Testdata    string // where SetFile paths are
}

// Resolve returns h running the helm binary directly when Command is "go tool ...
// helm": go tool builds it once (the first time, a few minutes) and go tool -n names the
// cached binary, which saves go tool's start-up on every call.
func (h Helm) Resolve() (Helm, error) {
	if len(h.Command) < 3 || filepath.Base(h.Command[0]) != "go" || h.Command[1] != "tool" {
		return h, nil
	}
	if _, err := h.run("version", "--short"); err != nil {
		return h, err
	}
	argv := append([]string{"tool", "-n"}, h.Command[2:]...)
	out, err := exec.Command(h.Command[0], argv...).Output()
	if err != nil {
		return h, fmt.Errorf("%s %v: %w", h.Command[0], argv, err)
	}
	bin := strings.TrimSpace(string(out))
	if strings.ContainsAny(bin, " \n") {
		return h, fmt.Errorf("go tool -n: unexpected output %q", bin)
	}
	h.Command = []string{bin}
	return h, nil
}

func (h Helm) args(s Scenario) []string {
	a := []string{"--kube-version", h.KubeVersion}
	for _, v := range s.Set {
		a = append(a, "--set", v)
	}
	for _, v := range s.SetFile {
		key, file, _ := bytesCut(v, "=")
		a = append(a, "--set-file", key+"="+filepath.Join(h.Testdata, file))
	}
	return a
}

func (h Helm) run(args ...string) ([]byte, error) {
	argv := append(append([]string{}, h.Command[1:]...), args...)
	cmd := exec.Command(h.Command[0], argv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("helm %v: %v\n%s%s", args, err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.Bytes(), nil
}

// Template renders the chart for a scenario, as release "veil" in namespace "veil".
func (h Helm) Template(chart string, s Scenario) ([]byte, error) {
	return h.run(append([]string{"template", "veil", chart, "--namespace", "veil"}, h.args(s)...)...)
}

// Lint runs helm lint --strict for a scenario.
func (h Helm) Lint(chart string, s Scenario) error {
	_, err := h.run(append([]string{"lint", "--strict", chart, "--namespace", "veil"}, h.args(s)...)...)
	return err
}

func bytesCut(s, sep string) (string, string, bool) {
	i := bytes.Index([]byte(s), []byte(sep))
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}
