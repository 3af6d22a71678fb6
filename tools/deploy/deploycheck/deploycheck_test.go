package deploycheck

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
)

const chart = "../../../deploy/helm/veil"

var helm = Helm{Command: []string{"go", "tool", "helm"}, KubeVersion: "1.33.0", Testdata: "testdata"}

func TestMain(m *testing.M) {
	h, err := helm.Resolve()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	helm = h
	os.Exit(m.Run())
}

var (
	renderMu sync.Mutex
	rendered = map[string][]byte{}
)

func scenario(t *testing.T, name string) Scenario {
	t.Helper()
	for _, s := range Scenarios() {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("no scenario %s", name)
	return Scenario{}
}

// render renders a scenario once per test binary.
func render(t *testing.T, name string) []Object {
	t.Helper()
	return renderScenario(t, scenario(t, name))
}

func renderScenario(t *testing.T, s Scenario) []Object {
	t.Helper()
	renderMu.Lock()
	manifest, ok := rendered[s.Name]
	if !ok {
		var err error
		if manifest, err = helm.Template(chart, s); err != nil {
			renderMu.Unlock()
			t.Fatal(err)
		}
		rendered[s.Name] = manifest
	}
	renderMu.Unlock()
	objs, err := Decode(manifest)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

func TestScenarios(t *testing.T) {
	for _, s := range Scenarios() {
		t.Run(s.Name, func(t *testing.T) {
			if err := helm.Lint(chart, s); err != nil {
				t.Fatal(err)
			}
			cfgs, err := Check(render(t, s.Name), s.Expect)
			if err != nil {
				t.Fatal(err)
			}
			want := 2 // scoring, analytics
			if s.Expect.Tokens {
				want++ // the token service
			}
			if len(cfgs) != want {
				t.Fatalf("%d serve.yaml files, want %d", len(cfgs), want)
			}
		})
	}
}

// A scenario checked against another scenario's expectation must fail: the checks
// look at what was rendered.
func TestWrongExpectationRefused(t *testing.T) {
	cases := []struct {
		render string
		expect Expect
		want   string
	}{
		{"veil-ca", Expect{Mode: "spire"}, `key "spiffe-socket" present=false`},
		{"spire", Expect{Mode: "cert-manager"}, "cert-manager mode renders no Certificate"},
		{"cert-manager", Expect{Mode: "cert-manager", NATS: true}, "state map present=false"},
		{"veil-ca-nats", Expect{Mode: "veil-ca"}, "state map present=true"},
		{"spire-hostpath-nats", Expect{Mode: "spire", NATS: true}, "hostPath is only allowed"},
		{"spire", Expect{Mode: "spire", HostPath: true, ClusterSPIFFEID: true}, "want a hostPath volume"},
		{"cert-manager-nats-region", Expect{Mode: "veil-ca", NATS: true, Region: true}, "one replica and no autoscaling in veil-ca mode"},
		{"spire-hostpath-nats", Expect{Mode: "spire", NATS: false, HostPath: true}, "one replica and no autoscaling in spire mode with state nats=false"},
		{"spire-hostpath-nats", Expect{Mode: "spire", NATS: true, HostPath: true, Region: true}, "has no peers (any address), but egress is restricted to a region"},
		{"veil-ca", Expect{Mode: "veil-ca", Tokens: true}, "no token service"},
		{"veil-ca", Expect{Mode: "veil-ca", Tokens: true}, "require-token false, want true"},
		{"spire-nats-tokens", Expect{Mode: "spire", NATS: true}, "require-token true, want false"},
		{"veil-ca-tokens", Expect{Mode: "veil-ca"}, "the token service (service auth) is rendered, but auth is not enabled"},
	}
	for _, c := range cases {
		_, err := Check(render(t, c.render), c.expect)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s checked as %+v: got %v, want an error containing %q", c.render, c.expect, err, c.want)
		}
	}
}

const rootDeployment = `apiVersion: apps/v1
kind: Deployment
metadata:
  name: root
  namespace: veil
spec:
  selector:
    matchLabels: {app: root}
  template:
    metadata:
      labels: {app: root}
    spec:
      containers:
        - name: veil
          image: veil:dev
          args: [serve]
          securityContext:
            runAsUser: 0
`

func TestDecodeRefuses(t *testing.T) {
	cases := []struct{ name, manifest, want string }{
		{"unknown field", strings.Replace(rootDeployment, "runAsUser: 0", "runAsUser: 65532\n            readOnlyRootFilesytem: true", 1), `unknown field "spec.template.spec.containers[0].securityContext.readOnlyRootFilesytem"`},
		{"field in the wrong case", strings.Replace(rootDeployment, "runAsUser: 0", "RunAsUser: 65532", 1), `unknown field "spec.template.spec.containers[0].securityContext.RunAsUser"`},
		{"duplicate key", strings.Replace(rootDeployment, "image: veil:dev", "image: veil:dev\n          image: other", 1), `key "image" already set`},
		{"wrong type", strings.Replace(rootDeployment, "runAsUser: 0", "runAsUser: nobody", 1), `cannot unmarshal string`},
		{"unknown kind", "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: x, namespace: veil}\n", "unknown kind networking.k8s.io/v1 Ingress"},
		{"old apiVersion", strings.Replace(rootDeployment, "apps/v1", "apps/v1beta2", 1), "unknown kind apps/v1beta2 Deployment"},
		{"no kind", "metadata: {name: x}\n", "apiVersion and kind are required"},
		{"bad name", strings.Replace(rootDeployment, "name: root", "name: Root_1", 1), "metadata.name Root_1"},
		{"no namespace", strings.Replace(rootDeployment, "  namespace: veil\n", "", 1), "metadata.namespace is empty"},
		{"bad label", strings.Replace(rootDeployment, "  name: root\n", "  name: root\n  labels: {\"a b\": x}\n", 1), "label key a b"},
		{"unknown Certificate field", "apiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {name: c, namespace: veil}\nspec:\n  secretName: s\n  uri: [spiffe://example.org/x]\n  issuerRef: {name: i}\n", `unknown field "spec.uri"`},
		{"unknown ClusterSPIFFEID field", "apiVersion: spire.spiffe.io/v1alpha1\nkind: ClusterSPIFFEID\nmetadata: {name: c}\nspec:\n  spiffeIdTemplate: spiffe://x/y\n", `unknown field "spec.spiffeIdTemplate"`},
		{"namespaced ClusterSPIFFEID", "apiVersion: spire.spiffe.io/v1alpha1\nkind: ClusterSPIFFEID\nmetadata: {name: c, namespace: veil}\nspec:\n  spiffeIDTemplate: spiffe://x/y\n", "cluster-scoped object with a namespace"},
	}
	for _, c := range cases {
		_, err := Decode([]byte("---\n" + c.manifest))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error containing %q", c.name, err, c.want)
		}
	}
}

// The root container decodes (it is a valid Deployment) but Check refuses it.
func TestRootContainerRefused(t *testing.T) {
	objs, err := Decode([]byte(rootDeployment))
	if err != nil {
		t.Fatal(err)
	}
	_, err = Check(objs, Expect{Mode: "cert-manager", NATS: true})
	for _, want := range []string{
		"runs as user 0, want 65532",
		"pod securityContext.runAsNonRoot must be true",
		"readOnlyRootFilesystem must be true",
		"allowPrivilegeEscalation must be false",
		"capabilities.drop must contain ALL",
		"seccompProfile must be RuntimeDefault",
		"resources.limits.memory missing",
		"readiness probe missing",
		"automountServiceAccountToken must be false",
		"no Service selects its pods",
		"no PodDisruptionBudget",
		"want one HorizontalPodAutoscaler",
		"no NetworkPolicy of its own",
		"no default-deny NetworkPolicy",
		"veil serve without --config",
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("root Deployment: got %v, want an error containing %q", err, want)
		}
	}
}

// Mutations of a good rendering, one setting at a time, must each be refused.
func TestMutationsRefused(t *testing.T) {
	s := scenario(t, "cert-manager-nats-region")
	find := func(objs []Object, kind, name string) any {
		for _, o := range objs {
			if o.Kind == kind && o.Name == name {
				return o.Value
			}
		}
		t.Fatalf("no %s/%s", kind, name)
		return nil
	}
	scoring := func(objs []Object) *appsv1.Deployment {
		return find(objs, "Deployment", "veil-scoring").(*appsv1.Deployment)
	}
	ctr := func(objs []Object) *corev1.Container { return &scoring(objs).Spec.Template.Spec.Containers[0] }
	no := false
	yes := true
	root := int64(0)
	cases := []mutation{
		{"root user", func(o []Object) []Object { ctr(o).SecurityContext.RunAsUser = &root; return o }, "runs as user 0"},
		{"writable root filesystem", func(o []Object) []Object { ctr(o).SecurityContext.ReadOnlyRootFilesystem = &no; return o }, "readOnlyRootFilesystem must be true"},
		{"privilege escalation", func(o []Object) []Object { ctr(o).SecurityContext.AllowPrivilegeEscalation = &yes; return o }, "allowPrivilegeEscalation must be false"},
		{"added capability", func(o []Object) []Object {
			ctr(o).SecurityContext.Capabilities.Add = []corev1.Capability{"NET_ADMIN"}
			return o
		}, "capabilities.add [NET_ADMIN]"},
		{"unconfined seccomp", func(o []Object) []Object {
			ctr(o).SecurityContext.SeccompProfile = &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeUnconfined}
			return o
		}, "seccompProfile must be RuntimeDefault"},
		{"service account token", func(o []Object) []Object { scoring(o).Spec.Template.Spec.AutomountServiceAccountToken = &yes; return o }, "pod automountServiceAccountToken must be false"},
		{"no memory limit", func(o []Object) []Object { delete(ctr(o).Resources.Limits, corev1.ResourceMemory); return o }, "resources.limits.memory missing"},
		{"request above limit", func(o []Object) []Object {
			ctr(o).Resources.Requests[corev1.ResourceCPU] = resource.MustParse("4")
			return o
		}, "requests.cpu 4 above limits"},
		{"shell probe", func(o []Object) []Object {
			ctr(o).LivenessProbe.HTTPGet = nil
			ctr(o).LivenessProbe.Exec = &corev1.ExecAction{Command: []string{"/bin/sh", "-c", "true"}}
			return o
		}, "probe execs a command"},
		{"gRPC probe", func(o []Object) []Object {
			ctr(o).ReadinessProbe.TCPSocket = nil
			ctr(o).ReadinessProbe.GRPC = &corev1.GRPCAction{Port: 8443}
			return o
		}, "mTLS only"},
		{"probe on a path the metrics listener lacks", func(o []Object) []Object { ctr(o).LivenessProbe.HTTPGet.Path = "/healthz"; return o }, `path "/healthz"`},
		{"selector not matching the pod labels", func(o []Object) []Object {
			scoring(o).Spec.Selector.MatchLabels["app.kubernetes.io/component"] = "scorer"
			return o
		}, "spec.selector does not match"},
		{"mount of a missing volume", func(o []Object) []Object { ctr(o).VolumeMounts[0].Name = "nope"; return o }, "mounts volume nope"},
		{"port name too long", func(o []Object) []Object { ctr(o).Ports[1].Name = "prometheus-metrics"; return o }, `port name "prometheus-metrics"`},
		{"GOMEMLIMIT above the limit", func(o []Object) []Object { ctr(o).Env[0].Value = "2GiB"; return o }, "GOMEMLIMIT 2GiB is not below"},
		{"GOMEMLIMIT misspelt", func(o []Object) []Object { ctr(o).Env[0].Value = "1300MB"; return o }, `GOMEMLIMIT "1300MB"`},
		{"shell command", func(o []Object) []Object { ctr(o).Command = []string{"/bin/sh", "-c"}; return o }, "no shell"},
		{"hostPath volume", func(o []Object) []Object {
			spec := &scoring(o).Spec.Template.Spec
			spec.Volumes = append(spec.Volumes, corev1.Volume{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/"}}})
			return o
		}, "hostPath is only allowed"},
		{"identity through subPath", func(o []Object) []Object {
			for i, m := range ctr(o).VolumeMounts {
				if m.Name == "identity" {
					ctr(o).VolumeMounts[i].MountPath = "/etc/veil/identity/tls.crt"
					ctr(o).VolumeMounts[i].SubPath = "tls.crt"
				}
			}
			return o
		}, "subPath mounts never see renewals"},
		{"no PDB", func(o []Object) []Object {
			return drop(o, func(x Object) bool {
				_, ok := x.Value.(*policyv1.PodDisruptionBudget)
				return ok && x.Name == "veil-scoring"
			})
		}, "no PodDisruptionBudget selects its pods"},
		{"no HPA", func(o []Object) []Object {
			return drop(o, func(x Object) bool {
				_, ok := x.Value.(*autoscalingv2.HorizontalPodAutoscaler)
				return ok && x.Name == "veil-scoring"
			})
		}, "want one HorizontalPodAutoscaler, got 0"},
		{"memory HPA", func(o []Object) []Object {
			find(o, "HorizontalPodAutoscaler", "veil-scoring").(*autoscalingv2.HorizontalPodAutoscaler).Spec.Metrics[0].Resource.Name = corev1.ResourceMemory
			return o
		}, "does not scale on CPU"},
		{"no default deny", func(o []Object) []Object {
			return drop(o, func(x Object) bool { return x.Name == "veil-default-deny" })
		}, "no default-deny NetworkPolicy"},
		{"no own network policy", func(o []Object) []Object {
			return drop(o, func(x Object) bool {
				_, ok := x.Value.(*networkingv1.NetworkPolicy)
				return ok && x.Name == "veil-scoring"
			})
		}, "no NetworkPolicy of its own"},
		{"ingress to every port", func(o []Object) []Object {
			np := find(o, "NetworkPolicy", "veil-scoring").(*networkingv1.NetworkPolicy)
			np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{})
			return o
		}, "opens every port"},
		{"ingress to a port not served", func(o []Object) []Object {
			np := find(o, "NetworkPolicy", "veil-scoring").(*networkingv1.NetworkPolicy)
			p := intstr.FromInt32(22)
			np.Spec.Ingress[0].Ports[0].Port = &p
			return o
		}, "ingress to port 22"},
		{"egress to the world despite a region", func(o []Object) []Object {
			np := find(o, "NetworkPolicy", "veil-scoring").(*networkingv1.NetworkPolicy)
			np.Spec.Egress[1].To = []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "0.0.0.0/0"}}}
			return o
		}, "allows 0.0.0.0/0"},
		{"certificate with two URIs", func(o []Object) []Object {
			c := find(o, "Certificate", "veil-scoring").(*Certificate)
			c.Spec.URIs = append(c.Spec.URIs, "spiffe://example.org/other")
			return o
		}, "exactly one URI SAN"},
		{"certificate URI not a SPIFFE ID", func(o []Object) []Object {
			find(o, "Certificate", "veil-scoring").(*Certificate).Spec.URIs = []string{"https://example.org/x"}
			return o
		}, "not a SPIFFE ID"},
		{"unknown serve.yaml key", func(o []Object) []Object {
			cm := find(o, "ConfigMap", "veil-scoring").(*corev1.ConfigMap)
			cm.Data["serve.yaml"] += "\nlisten-addr: :1\n"
			return o
		}, `unknown key "listen-addr"`},
		{"classic key exchange", func(o []Object) []Object {
			cm := find(o, "ConfigMap", "veil-scoring").(*corev1.ConfigMap)
			cm.Data["serve.yaml"] = strings.Replace(cm.Data["serve.yaml"], "pq: strict", "pq: permissive", 1)
			return o
		}, `pq "permissive"`},
		{"rendered Secret", func(o []Object) []Object {
			return append(o, Object{Kind: "Secret", Name: "leak", Value: &corev1.Secret{}})
		}, "must not render Secrets"},
	}
	checkMutations(t, s, cases)
}

// mutation is a change to a rendering that the checker must refuse with want.
type mutation = struct {
	name   string
	mutate func([]Object) []Object
	want   string
}

func checkMutations(t *testing.T, s Scenario, cases []mutation) {
	t.Helper()
	// The unmutated rendering passes.
	if _, err := Check(render(t, s.Name), s.Expect); err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		_, err := Check(c.mutate(render(t, s.Name)), s.Expect)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error containing %q", c.name, err, c.want)
		}
	}
}

// TestTokenMutationsRefused breaks the continuous-authentication wiring.
func TestTokenMutationsRefused(t *testing.T) {
	s := scenario(t, "spire-nats-tokens")
	deployment := func(objs []Object, name string) *appsv1.Deployment {
		for _, o := range objs {
			if d, ok := o.Value.(*appsv1.Deployment); ok && o.Name == name {
				return d
			}
		}
		t.Fatalf("no Deployment %s", name)
		return nil
	}
	config := func(objs []Object, name string) *corev1.ConfigMap {
		for _, o := range objs {
			if cm, ok := o.Value.(*corev1.ConfigMap); ok && o.Name == name {
				return cm
			}
		}
		t.Fatalf("no ConfigMap %s", name)
		return nil
	}
	edit := func(name, old, new string) func([]Object) []Object {
		return func(o []Object) []Object {
			cm := config(o, name)
			if !strings.Contains(cm.Data["serve.yaml"], old) {
				t.Fatalf("%s serve.yaml has no %q:\n%s", name, old, cm.Data["serve.yaml"])
			}
			cm.Data["serve.yaml"] = strings.Replace(cm.Data["serve.yaml"], old, new, 1)
			return o
		}
	}
	checkMutations(t, s, []mutation{
		{"a server that does not require tokens", edit("veil-analytics", "require-token: true", "require-token: false"), "require-token false, want true"},
		{"a server that mounts the signing key", func(o []Object) []Object {
			auth := deployment(o, "veil-auth").Spec.Template.Spec
			spec := &deployment(o, "veil-scoring").Spec.Template.Spec
			for _, v := range auth.Volumes {
				if v.Name == "token-signing-key" {
					spec.Volumes = append(spec.Volumes, v)
				}
			}
			return o
		}, "mounts the token service's signing key"},
		{"the signing key from a ConfigMap", func(o []Object) []Object {
			spec := &deployment(o, "veil-auth").Spec.Template.Spec
			for i, v := range spec.Volumes {
				if v.Name == "token-signing-key" {
					spec.Volumes[i].VolumeSource = corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "leak"}}}
				}
			}
			return o
		}, "is not mounted from a Secret"},
		{"the token service beside another service", edit("veil-auth", "- auth", "- auth\n- echo"), "the token service runs alone"},
		{"an issuer that is not a SPIFFE ID", edit("veil-scoring", "token-issuer: spiffe://", "token-issuer: https://"), "token-issuer"},
		{"no token service", func(o []Object) []Object {
			return drop(o, func(x Object) bool { return x.Name == "veil-auth" })
		}, "no token service"},
	})
}

func drop(objs []Object, f func(Object) bool) []Object {
	var out []Object
	for _, o := range objs {
		if !f(o) {
			out = append(out, o)
		}
	}
	return out
}

// Values that cannot work are refused by the chart itself.
func TestChartRefusesValues(t *testing.T) {
	cases := []struct {
		set  []string
		want string
	}{
		{[]string{"identity.mode=istio"}, "/identity/mode"},
		{[]string{"state.backend=redis"}, "/state/backend"},
		{[]string{"ca.enabled=false"}, "identity.mode veil-ca needs ca.enabled or identity.veilCA.url"},
		{[]string{"networkPolicy.egressRegion.enabled=true"}, "egressRegion.enabled needs allowedCIDRs"},
		{[]string{"networkPolicy.egressRegion.enabled=true", "networkPolicy.egressRegion.allowedCIDRs={10.0.0.0/8}", "networkPolicy.extraEgress[0].ports[0].port=443"}, "every networkPolicy.extraEgress rule needs peers"},
		{[]string{"identity.mode=spire", "identity.spire.socketVolume=nfs"}, `socketVolume`},
		// values.schema.json: misspelt keys and out-of-range values.
		{[]string{"identity.mod=spire"}, "additional properties 'mod' not allowed"},
		{[]string{"scoring.keysMemroy=1"}, "additional properties 'keysMemroy' not allowed"},
		{[]string{"state.backend=nats", "state.replicas=7"}, "maximum: got 7, want 5"},
		{[]string{"identity.veilCA.certTTL=1day"}, "/identity/veilCA/certTTL"},
		{[]string{"pq=off"}, "/pq"},
		{[]string{"auth.enabled=true", "auth.publicKey.pem=not a key"}, "auth.publicKey.pem: want the token service's public key in PEM"},
		{[]string{"auth.tokenTTL=5 minutes"}, "/auth/tokenTTL"},
	}
	for _, c := range cases {
		_, err := helm.Template(chart, Scenario{Name: "refused", Set: c.set})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: got %v, want an error containing %q", c.set, err, c.want)
		}
	}
}
