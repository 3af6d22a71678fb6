package deploycheck

import (
	"errors"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Expect is what a rendering was asked for: the values that change which objects and
// settings must be there.
type Expect struct {
	Mode            string // identity.mode: veil-ca, spire or cert-manager
	NATS            bool   // state.backend nats
	Region          bool   // networkPolicy.egressRegion.enabled
	HostPath        bool   // spire socket from a hostPath volume (else the CSI driver)
	ClusterSPIFFEID bool   // identity.spire.clusterSPIFFEID.enabled
	Tokens          bool   // auth.enabled (with requireToken): the token service, and servers requiring tokens
	HTTP3           bool   // http3.enabled: serve.yaml http3, and the rpc port over UDP in the container, Service and NetworkPolicy
}

// UID is the user every container runs as (the distroless "nonroot" user).
const UID = 65532

// serveKeys are veil serve's flag names (cmd/veil/serve.go, identity.go, services.go)
// plus the config file's own keys (policy, state). `veil serve --check` is the
// authoritative check; this catches a misspelt key without building veil.
var serveKeys = []string{"identity", "ca", "ca-bundle", "join-token", "id", "cert-ttl", "renew-before",
	"degrade-below", "spiffe-socket", "spiffe-timeout", "listen", "service", "scoring-model",
	"keys-store", "keys-memory", "analytics-store", "allow", "pq", "pq-seal", "ticket-keys",
	"metrics", "grace", "policy", "state", "token-signing-key", "token-ttl", "require-token", "token-issuer",
	"token-public-key", "http3"}

// stateKeys are the state map's keys: the --state-* flags without the prefix.
var stateKeys = []string{"backend", "url", "replicas", "ca", "prefix", "ticket-key-period"}

// workload is a pod template and what owns it.
type workload struct {
	obj         Object
	tmpl        corev1.PodTemplateSpec
	longRunning bool
}

func (w workload) component() string { return w.tmpl.Labels["app.kubernetes.io/component"] }

// ServeConfig is a rendered serve.yaml and the Deployment that reads it.
type ServeConfig struct {
	Deployment string
	ConfigMap  string
	Data       []byte
}

// Check asserts the chart's defaults on decoded objects: pod and container security,
// resources, probes, the objects around each Deployment (Service, PodDisruptionBudget,
// HorizontalPodAutoscaler, NetworkPolicy, ServiceAccount), the identity mode's wiring
// and each serve.yaml. It returns every problem found, joined, and the serve.yaml files.
func Check(objs []Object, e Expect) ([]ServeConfig, error) {
	c := &checker{e: e}
	c.run(objs)
	return c.configs, errors.Join(c.errs...)
}

type checker struct {
	e       Expect
	errs    []error
	configs []ServeConfig
	// Continuous authentication: the Secrets holding the token service's signing key,
	// and the Secrets every other workload mounts (which must not include them).
	signingSecrets map[string]bool
	otherSecrets   map[string][]Object
	tokenServices  int
}

func (c *checker) errorf(o fmt.Stringer, format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%s: %s", o, fmt.Sprintf(format, args...)))
}

func byKind[T any](objs []Object) []T {
	var out []T
	for _, o := range objs {
		if v, ok := o.Value.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

func (c *checker) run(objs []Object) {
	if !slices.Contains([]string{"veil-ca", "spire", "cert-manager"}, c.e.Mode) {
		c.errs = append(c.errs, fmt.Errorf("expectation: unknown identity mode %q", c.e.Mode))
		return
	}
	var workloads []workload
	for _, o := range objs {
		switch v := o.Value.(type) {
		case *appsv1.Deployment:
			workloads = append(workloads, workload{o, v.Spec.Template, true})
		case *appsv1.StatefulSet:
			workloads = append(workloads, workload{o, v.Spec.Template, true})
		case *batchv1.Job:
			workloads = append(workloads, workload{o, v.Spec.Template, false})
		case *corev1.ServiceAccount:
			if v.AutomountServiceAccountToken == nil || *v.AutomountServiceAccountToken {
				c.errorf(o, "automountServiceAccountToken must be false")
			}
		case *corev1.Secret:
			c.errorf(o, "the chart must not render Secrets (keys and tokens are created out of band)")
		case *Certificate:
			if err := v.Validate(); err != nil {
				c.errorf(o, "%v", err)
			}
		case *ClusterSPIFFEID:
			if err := v.Validate(); err != nil {
				c.errorf(o, "%v", err)
			}
		case *networkingv1.NetworkPolicy:
			c.checkNetworkPolicy(o, v)
		}
	}
	if len(workloads) == 0 {
		c.errs = append(c.errs, errors.New("no workloads rendered"))
	}
	sas := map[string]bool{}
	for _, sa := range byKind[*corev1.ServiceAccount](objs) {
		sas[sa.Namespace+"/"+sa.Name] = true
	}
	for _, w := range workloads {
		c.checkPod(w)
		sa := w.tmpl.Spec.ServiceAccountName
		if sa != "" && sa != "default" && !sas[w.obj.Namespace+"/"+sa] {
			c.errorf(w.obj, "serviceAccountName %q is not rendered", sa)
		}
		if !w.longRunning {
			continue
		}
		c.checkAround(w, objs)
		c.checkIdentity(w, objs)
	}
	c.checkDefaultDeny(objs)
	c.checkTokens()
	if c.e.Mode == "cert-manager" && len(byKind[*Certificate](objs)) == 0 {
		c.errs = append(c.errs, errors.New("cert-manager mode renders no Certificate"))
	}
	if c.e.Mode != "cert-manager" && len(byKind[*Certificate](objs)) > 0 {
		c.errs = append(c.errs, fmt.Errorf("%s mode renders a Certificate", c.e.Mode))
	}
	if got := len(byKind[*ClusterSPIFFEID](objs)) > 0; got != (c.e.Mode == "spire" && c.e.ClusterSPIFFEID) {
		c.errs = append(c.errs, fmt.Errorf("ClusterSPIFFEID rendered: %v, expected %v", got, c.e.Mode == "spire" && c.e.ClusterSPIFFEID))
	}
}

// checkPod asserts the pod and container security settings and resources.
func (c *checker) checkPod(w workload) {
	o, spec := w.obj, w.tmpl.Spec
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		c.errorf(o, "pod automountServiceAccountToken must be false (no mode needs the API)")
	}
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		c.errorf(o, "hostNetwork, hostPID and hostIPC must be off")
	}
	psc := spec.SecurityContext
	if psc == nil {
		c.errorf(o, "pod securityContext missing")
		psc = &corev1.PodSecurityContext{}
	}
	if psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
		c.errorf(o, "pod securityContext.runAsNonRoot must be true")
	}
	if psc.RunAsUser == nil || *psc.RunAsUser != UID {
		c.errorf(o, "pod securityContext.runAsUser must be %d", UID)
	}
	if psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		c.errorf(o, "pod securityContext.seccompProfile must be RuntimeDefault")
	}
	for _, v := range spec.Volumes {
		if v.HostPath != nil && (c.e.Mode != "spire" || !c.e.HostPath) {
			c.errorf(o, "volume %s: hostPath is only allowed for the SPIRE socket when asked for", v.Name)
		}
	}
	// What the API server's validation would refuse and decoding cannot see.
	if sel := selectorOf(o); sel != nil && !selects(sel, w.tmpl.Labels) {
		c.errorf(o, "spec.selector does not match the pod template's labels")
	}
	volumes := map[string]bool{}
	for _, v := range spec.Volumes {
		for _, p := range validation.IsDNS1123Label(v.Name) {
			c.errorf(o, "volume name %q: %s", v.Name, p)
		}
		if volumes[v.Name] {
			c.errorf(o, "volume %s defined twice", v.Name)
		}
		volumes[v.Name] = true
	}
	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	for _, ctr := range all {
		for _, p := range validation.IsDNS1123Label(ctr.Name) {
			c.errorf(o, "container name %q: %s", ctr.Name, p)
		}
		paths := map[string]bool{}
		for _, m := range ctr.VolumeMounts {
			if !volumes[m.Name] {
				c.errorf(o, "container %s mounts volume %s, which the pod does not define", ctr.Name, m.Name)
			}
			if paths[m.MountPath] {
				c.errorf(o, "container %s mounts %s twice", ctr.Name, m.MountPath)
			}
			paths[m.MountPath] = true
		}
		names := map[string]bool{}
		for _, p := range ctr.Ports {
			if p.Name == "" {
				c.errorf(o, "container %s: port %d has no name (probes and Services refer to names)", ctr.Name, p.ContainerPort)
			}
			for _, msg := range validation.IsValidPortName(p.Name) {
				c.errorf(o, "container %s: port name %q: %s", ctr.Name, p.Name, msg)
			}
			if names[p.Name] {
				c.errorf(o, "container %s: port name %s twice", ctr.Name, p.Name)
			}
			names[p.Name] = true
		}
	}
	if len(spec.Containers) == 0 {
		c.errorf(o, "no containers")
	}
	for _, ctr := range all {
		c.checkContainer(o, psc, spec.Volumes, ctr, w.longRunning)
	}
}

func (c *checker) checkContainer(o Object, psc *corev1.PodSecurityContext, vols []corev1.Volume, ctr corev1.Container, longRunning bool) {
	name := fmt.Sprintf("container %s", ctr.Name)
	sc := ctr.SecurityContext
	if sc == nil {
		c.errorf(o, "%s: securityContext missing", name)
		sc = &corev1.SecurityContext{}
	}
	if sc.RunAsNonRoot != nil && !*sc.RunAsNonRoot {
		c.errorf(o, "%s: runAsNonRoot false", name)
	}
	uid := psc.RunAsUser
	if sc.RunAsUser != nil {
		uid = sc.RunAsUser
	}
	if uid == nil || *uid != UID {
		c.errorf(o, "%s: runs as user %v, want %d (root or unset is refused)", name, deref(uid), UID)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		c.errorf(o, "%s: readOnlyRootFilesystem must be true", name)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		c.errorf(o, "%s: allowPrivilegeEscalation must be false", name)
	}
	if sc.Privileged != nil && *sc.Privileged {
		c.errorf(o, "%s: privileged", name)
	}
	if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		c.errorf(o, "%s: capabilities.drop must contain ALL", name)
	} else if len(sc.Capabilities.Add) > 0 {
		c.errorf(o, "%s: capabilities.add %v", name, sc.Capabilities.Add)
	}
	seccomp := psc.SeccompProfile
	if sc.SeccompProfile != nil {
		seccomp = sc.SeccompProfile
	}
	if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
		c.errorf(o, "%s: seccompProfile must be RuntimeDefault", name)
	}
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, okReq := ctr.Resources.Requests[r]
		lim, okLim := ctr.Resources.Limits[r]
		if !okReq || req.IsZero() {
			c.errorf(o, "%s: resources.requests.%s missing", name, r)
		}
		if !okLim || lim.IsZero() {
			c.errorf(o, "%s: resources.limits.%s missing", name, r)
		}
		if okReq && okLim && req.Cmp(lim) > 0 {
			c.errorf(o, "%s: requests.%s %s above limits %s", name, r, req.String(), lim.String())
		}
	}
	for _, e := range ctr.Env {
		if e.Name != "GOMEMLIMIT" {
			continue
		}
		n, err := parseGoMemLimit(e.Value)
		lim, ok := ctr.Resources.Limits[corev1.ResourceMemory]
		switch {
		case err != nil:
			c.errorf(o, "%s: GOMEMLIMIT %q: %v", name, e.Value, err)
		case ok && n >= lim.Value():
			c.errorf(o, "%s: GOMEMLIMIT %s is not below the memory limit %s (the GC would not act before the OOM killer)", name, e.Value, lim.String())
		}
	}
	// The image is FROM scratch: /veil and nothing else, no shell.
	if len(ctr.Command) > 0 {
		c.errorf(o, "%s: command %v: the image's entrypoint is /veil and it has no shell", name, ctr.Command)
	}
	if len(ctr.Args) == 0 || !slices.Contains([]string{"serve", "ca"}, ctr.Args[0]) {
		c.errorf(o, "%s: args %v: want a veil subcommand (serve, ca ...)", name, ctr.Args)
	}
	probes := map[string]*corev1.Probe{"startup": ctr.StartupProbe, "readiness": ctr.ReadinessProbe, "liveness": ctr.LivenessProbe}
	for kind, p := range probes {
		if p == nil {
			if longRunning && kind != "startup" {
				c.errorf(o, "%s: %s probe missing", name, kind)
			}
			continue
		}
		switch {
		case p.Exec != nil:
			c.errorf(o, "%s: %s probe execs a command, but the image has no shell or tools", name, kind)
		case p.GRPC != nil:
			c.errorf(o, "%s: %s probe uses gRPC, but Veil's health service is mTLS only", name, kind)
		case p.HTTPGet != nil:
			if p.HTTPGet.Scheme == corev1.URISchemeHTTPS || !c.portIs(ctr, p.HTTPGet.Port.String(), "metrics") {
				c.errorf(o, "%s: %s probe: HTTP only on the plain metrics port", name, kind)
			} else if p.HTTPGet.Path != "/metrics" {
				c.errorf(o, "%s: %s probe path %q: the metrics listener serves /metrics only", name, kind, p.HTTPGet.Path)
			}
		case p.TCPSocket != nil:
			if !c.portIs(ctr, p.TCPSocket.Port.String(), "") {
				c.errorf(o, "%s: %s probe port %s is not a container port", name, kind, p.TCPSocket.Port.String())
			}
		default:
			c.errorf(o, "%s: %s probe has no handler", name, kind)
		}
	}
	for _, m := range ctr.VolumeMounts {
		for _, v := range vols {
			if v.Name == m.Name && (v.HostPath != nil || v.CSI != nil) && !m.ReadOnly {
				c.errorf(o, "%s: mount %s of a host or CSI volume must be readOnly", name, m.Name)
			}
		}
	}
}

// portIs reports whether p (a name or number) is a port of ctr, named want if want is set.
func (c *checker) portIs(ctr corev1.Container, p, want string) bool {
	for _, cp := range ctr.Ports {
		if cp.Name == p || fmt.Sprint(cp.ContainerPort) == p {
			return want == "" || cp.Name == want
		}
	}
	return false
}

func deref(p *int64) any {
	if p == nil {
		return "unset"
	}
	return *p
}

func selects(sel *metav1.LabelSelector, lbls map[string]string) bool {
	if sel == nil {
		return false
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return false
	}
	return s.Matches(labels.Set(lbls))
}

func selectorOf(o Object) *metav1.LabelSelector {
	switch v := o.Value.(type) {
	case *appsv1.Deployment:
		return v.Spec.Selector
	case *appsv1.StatefulSet:
		return v.Spec.Selector
	}
	return nil
}

// checkAround asserts the objects a long-running workload needs beside it.
func (c *checker) checkAround(w workload, objs []Object) {
	o, lbls, ns := w.obj, w.tmpl.Labels, w.obj.Namespace
	isCA := w.component() == "ca"
	var hasService bool
	for _, s := range byKind[*corev1.Service](objs) {
		if s.Namespace == ns && len(s.Spec.Selector) > 0 && labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(lbls)) {
			hasService = true
			for _, p := range s.Spec.Ports {
				ok := false
				for _, ctr := range w.tmpl.Spec.Containers {
					ok = ok || c.portIs(ctr, p.TargetPort.String(), "")
				}
				if !ok {
					c.errorf(o, "Service %s port %s targets %s, not a container port", s.Name, p.Name, p.TargetPort.String())
				}
			}
		}
	}
	if !hasService {
		c.errorf(o, "no Service selects its pods")
	}
	var hasPDB bool
	for _, p := range byKind[*policyv1.PodDisruptionBudget](objs) {
		if p.Namespace == ns && selects(p.Spec.Selector, lbls) {
			hasPDB = true
			if p.Spec.MinAvailable != nil && p.Spec.MaxUnavailable != nil {
				c.errorf(o, "PodDisruptionBudget %s sets both minAvailable and maxUnavailable", p.Name)
			}
		}
	}
	if !hasPDB && !isCA {
		c.errorf(o, "no PodDisruptionBudget selects its pods")
	}
	var hpas []*autoscalingv2.HorizontalPodAutoscaler
	for _, h := range byKind[*autoscalingv2.HorizontalPodAutoscaler](objs) {
		if h.Namespace == ns && h.Spec.ScaleTargetRef.Kind == o.Kind && h.Spec.ScaleTargetRef.Name == o.Name {
			hpas = append(hpas, h)
		}
	}
	d, _ := o.Value.(*appsv1.Deployment)
	switch {
	case isCA:
		if len(hpas) > 0 || d == nil || d.Spec.Replicas == nil || *d.Spec.Replicas != 1 || d.Spec.Strategy.Type != appsv1.RecreateDeploymentStrategyType {
			c.errorf(o, "the CA is one replica, Recreate, without autoscaling (one writer of its directory)")
		}
	case c.e.Mode == "veil-ca" || !c.e.NATS:
		if len(hpas) > 0 || d == nil || d.Spec.Replicas == nil || *d.Spec.Replicas != 1 {
			c.errorf(o, "one replica and no autoscaling in %s mode with state nats=%v (a join token serves one pod; embedded state is per replica)", c.e.Mode, c.e.NATS)
		}
	default:
		if len(hpas) != 1 {
			c.errorf(o, "want one HorizontalPodAutoscaler, got %d", len(hpas))
		}
		for _, h := range hpas {
			cpu := false
			for _, m := range h.Spec.Metrics {
				cpu = cpu || (m.Type == autoscalingv2.ResourceMetricSourceType && m.Resource != nil && m.Resource.Name == corev1.ResourceCPU &&
					m.Resource.Target.Type == autoscalingv2.UtilizationMetricType && m.Resource.Target.AverageUtilization != nil)
			}
			if !cpu {
				c.errorf(o, "HorizontalPodAutoscaler %s does not scale on CPU utilization", h.Name)
			}
			if h.Spec.MinReplicas == nil || *h.Spec.MinReplicas < 2 || h.Spec.MaxReplicas < *h.Spec.MinReplicas {
				c.errorf(o, "HorizontalPodAutoscaler %s: minReplicas at least 2 and maxReplicas at least that", h.Name)
			}
			if d != nil && d.Spec.Replicas != nil {
				c.errorf(o, "replicas is set although an HPA scales it (every upgrade would reset the HPA's choice)")
			}
		}
	}
	// Network: a policy of its own with both directions, ingress only to its ports.
	own := false
	for _, np := range byKind[*networkingv1.NetworkPolicy](objs) {
		if np.Namespace != ns || !selects(&np.Spec.PodSelector, lbls) {
			continue
		}
		types := np.Spec.PolicyTypes
		if slices.Contains(types, networkingv1.PolicyTypeIngress) && slices.Contains(types, networkingv1.PolicyTypeEgress) && len(np.Spec.PodSelector.MatchLabels["app.kubernetes.io/component"]) > 0 {
			own = true
		}
		for _, r := range np.Spec.Ingress {
			if len(r.Ports) == 0 {
				c.errorf(o, "NetworkPolicy %s: an ingress rule without ports opens every port", np.Name)
			}
			for _, p := range r.Ports {
				ok := false
				for _, ctr := range w.tmpl.Spec.Containers {
					ok = ok || (p.Port != nil && c.portIs(ctr, p.Port.String(), ""))
				}
				if !ok {
					c.errorf(o, "NetworkPolicy %s: ingress to port %v, which the pod does not serve", np.Name, p.Port)
				}
			}
		}
	}
	if !own {
		c.errorf(o, "no NetworkPolicy of its own covering ingress and egress")
	}
}

// checkNetworkPolicy asserts egress rules are narrow: ports always, and with a region
// restriction, peers always and never the whole address space.
func (c *checker) checkNetworkPolicy(o Object, np *networkingv1.NetworkPolicy) {
	for i, r := range np.Spec.Egress {
		if len(r.Ports) == 0 {
			c.errorf(o, "egress rule %d has no ports (every port)", i)
		}
		if c.e.Region && len(r.To) == 0 {
			c.errorf(o, "egress rule %d has no peers (any address), but egress is restricted to a region", i)
		}
		for _, p := range r.To {
			if p.IPBlock != nil && c.e.Region && (strings.HasSuffix(p.IPBlock.CIDR, "/0")) {
				c.errorf(o, "egress rule %d allows %s, but egress is restricted to a region", i, p.IPBlock.CIDR)
			}
		}
	}
	for i, r := range np.Spec.Ingress {
		if len(r.Ports) == 0 {
			c.errorf(o, "ingress rule %d has no ports (every port)", i)
		}
	}
	if len(np.Spec.PolicyTypes) == 0 {
		c.errorf(o, "policyTypes must be explicit")
	}
}

func (c *checker) checkDefaultDeny(objs []Object) {
	for _, np := range byKind[*networkingv1.NetworkPolicy](objs) {
		if len(np.Spec.Ingress) == 0 && len(np.Spec.Egress) == 0 && len(np.Spec.PolicyTypes) == 2 &&
			np.Spec.PodSelector.MatchLabels["app.kubernetes.io/instance"] != "" && np.Spec.PodSelector.MatchLabels["app.kubernetes.io/component"] == "" {
			return
		}
	}
	c.errs = append(c.errs, errors.New("no default-deny NetworkPolicy for the release's pods"))
}

// mountAt returns the volume mounted at dir (or at a file inside it with subPath).
func mountAt(spec corev1.PodSpec, ctr corev1.Container, file string) (*corev1.Volume, *corev1.VolumeMount) {
	for i := range ctr.VolumeMounts {
		m := &ctr.VolumeMounts[i]
		if m.MountPath == file || strings.HasPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/") {
			for j := range spec.Volumes {
				if spec.Volumes[j].Name == m.Name {
					return &spec.Volumes[j], m
				}
			}
		}
	}
	return nil, nil
}

// checkIdentity follows a veil serve Deployment to its serve.yaml and checks the
// identity mode's wiring and the config's keys.
func (c *checker) checkIdentity(w workload, objs []Object) {
	o, spec := w.obj, w.tmpl.Spec
	if len(spec.Containers) == 0 {
		return
	}
	ctr := spec.Containers[0]
	if len(ctr.Args) == 0 || ctr.Args[0] != "serve" {
		return
	}
	i := slices.Index(ctr.Args, "--config")
	if i < 0 || i+1 >= len(ctr.Args) {
		c.errorf(o, "veil serve without --config")
		return
	}
	file := ctr.Args[i+1]
	vol, mount := mountAt(spec, ctr, file)
	if vol == nil || vol.ConfigMap == nil {
		c.errorf(o, "--config %s is not mounted from a ConfigMap", file)
		return
	}
	key := path.Base(file)
	if mount.SubPath != "" {
		key = mount.SubPath
	}
	var data string
	found := false
	for _, cm := range byKind[*corev1.ConfigMap](objs) {
		if cm.Namespace == o.Namespace && cm.Name == vol.ConfigMap.Name {
			data, found = cm.Data[key]
		}
	}
	if !found {
		c.errorf(o, "ConfigMap %s with key %s is not rendered", vol.ConfigMap.Name, key)
		return
	}
	c.configs = append(c.configs, ServeConfig{Deployment: o.Name, ConfigMap: vol.ConfigMap.Name, Data: []byte(data)})
	var cfg map[string]any
	if err := strictUnmarshal([]byte(data), &cfg); err != nil {
		c.errorf(o, "serve.yaml: %v", err)
		return
	}
	for k := range cfg {
		if !slices.Contains(serveKeys, k) {
			c.errorf(o, "serve.yaml: unknown key %q", k)
		}
	}
	c.checkHTTP3(w, cfg, objs)
	str := func(k string) string { s, _ := cfg[k].(string); return s }
	if svc, _ := cfg["service"].([]any); len(svc) == 0 {
		c.errorf(o, "serve.yaml: no service")
	} else if w.component() != "" && !slices.Contains(svc, any(w.component())) {
		c.errorf(o, "serve.yaml: services %v do not include the component %s", svc, w.component())
	}
	if str("pq") != "strict" {
		c.errorf(o, "serve.yaml: pq %q, want strict (post-quantum key exchange only)", str("pq"))
	}
	// Exactly one identity source, the mode's.
	sources := map[string]string{"veil-ca": "ca", "spire": "spiffe-socket", "cert-manager": "identity"}
	for mode, k := range sources {
		if _, has := cfg[k]; has != (mode == c.e.Mode) {
			c.errorf(o, "serve.yaml: %s mode, but key %q present=%v", c.e.Mode, k, has)
		}
	}
	switch c.e.Mode {
	case "veil-ca":
		if !strings.HasPrefix(str("ca"), "https://") {
			c.errorf(o, "serve.yaml: ca %q: want https://", str("ca"))
		}
		if err := checkSPIFFEID(str("id")); err != nil {
			c.errorf(o, "serve.yaml: id: %v", err)
		}
		tok, ok := strings.CutPrefix(str("join-token"), "@")
		if !ok {
			c.errorf(o, "serve.yaml: join-token must be @FILE (a token in a ConfigMap would leak and be single use anyway)")
		} else if v, _ := mountAt(spec, ctr, tok); v == nil || v.Secret == nil {
			c.errorf(o, "join token %s is not mounted from a Secret", tok)
		}
		if v, _ := mountAt(spec, ctr, str("ca-bundle")); v == nil || (v.ConfigMap == nil && v.Secret == nil) {
			c.errorf(o, "ca-bundle %s is not mounted", str("ca-bundle"))
		}
	case "spire":
		v, _ := mountAt(spec, ctr, str("spiffe-socket"))
		switch {
		case v == nil:
			c.errorf(o, "spiffe-socket %s is not mounted", str("spiffe-socket"))
		case c.e.HostPath && v.HostPath == nil:
			c.errorf(o, "spiffe-socket: want a hostPath volume")
		case !c.e.HostPath && (v.CSI == nil || v.CSI.Driver != "csi.spiffe.io" || v.CSI.ReadOnly == nil || !*v.CSI.ReadOnly):
			c.errorf(o, "spiffe-socket: want a read-only csi.spiffe.io volume")
		}
		if c.e.ClusterSPIFFEID {
			ok := false
			for _, id := range byKind[*ClusterSPIFFEID](objs) {
				ok = ok || selects(id.Spec.PodSelector, w.tmpl.Labels)
			}
			if !ok {
				c.errorf(o, "no ClusterSPIFFEID selects its pods")
			}
		}
	case "cert-manager":
		dir := str("identity")
		v, m := mountAt(spec, ctr, dir+"/tls.crt")
		if v == nil || v.Secret == nil {
			c.errorf(o, "identity %s is not mounted from a Secret", dir)
			break
		}
		if m.SubPath != "" || m.MountPath != dir {
			c.errorf(o, "identity %s: mount the whole Secret as the directory (subPath mounts never see renewals)", dir)
		}
		ok := false
		for _, cert := range byKind[*Certificate](objs) {
			ok = ok || (cert.Namespace == o.Namespace && cert.Spec.SecretName == v.Secret.SecretName)
		}
		if !ok {
			c.errorf(o, "no Certificate writes the Secret %s", v.Secret.SecretName)
		}
	}
	c.checkTokenConfig(w, ctr, cfg)
	st, hasState := cfg["state"].(map[string]any)
	if hasState != c.e.NATS {
		c.errorf(o, "serve.yaml: state map present=%v, want %v (state.backend nats)", hasState, c.e.NATS)
	}
	if hasState {
		for k := range st {
			if !slices.Contains(stateKeys, k) {
				c.errorf(o, "serve.yaml: state: unknown key %q", k)
			}
		}
		url, _ := st["url"].(string)
		if st["backend"] != "nats" || (!strings.HasPrefix(url, "tls://") && !strings.HasPrefix(url, "nats://")) {
			c.errorf(o, "serve.yaml: state: want backend nats and a nats:// or tls:// url, got %v", st)
		}
		if n, ok := st["replicas"].(int64); !ok || n < 1 || n > 5 {
			c.errorf(o, "serve.yaml: state.replicas %v: want 1 to 5 (JetStream)", st["replicas"])
		}
		for _, k := range []string{"keys-store", "analytics-store"} {
			if _, has := cfg[k]; has {
				c.errorf(o, "serve.yaml: %s with state nats (veil serve refuses it: the buckets hold that state)", k)
			}
		}
	}
}

// checkTokenConfig checks a serve.yaml's continuous-authentication wiring: the token
// service reads its signing key from a Secret; with Expect.Tokens every other server
// requires tokens from it and verifies them with a public key; without, none does.
func (c *checker) checkTokenConfig(w workload, ctr corev1.Container, cfg map[string]any) {
	o, spec := w.obj, w.tmpl.Spec
	str := func(k string) string { s, _ := cfg[k].(string); return s }
	svc, _ := cfg["service"].([]any)
	if slices.Contains(svc, any("auth")) {
		c.tokenServices++
		if !c.e.Tokens {
			c.errorf(o, "serve.yaml: the token service (service auth) is rendered, but auth is not enabled")
		}
		if len(svc) != 1 {
			c.errorf(o, "serve.yaml: the token service runs alone (its signing key must not sit beside other services), got services %v", svc)
		}
		v, m := mountAt(spec, ctr, str("token-signing-key"))
		switch {
		case v == nil || v.Secret == nil:
			c.errorf(o, "token-signing-key %q is not mounted from a Secret", str("token-signing-key"))
		case m.SubPath != "":
			c.errorf(o, "token-signing-key: mount the Secret as a directory (subPath mounts never see updates)")
		default:
			if c.signingSecrets == nil {
				c.signingSecrets = map[string]bool{}
			}
			c.signingSecrets[v.Secret.SecretName] = true
		}
		if str("token-ttl") == "" {
			c.errorf(o, "serve.yaml: the token service without token-ttl")
		}
		return
	}
	for _, v := range spec.Volumes {
		if v.Secret != nil {
			if c.otherSecrets == nil {
				c.otherSecrets = map[string][]Object{}
			}
			c.otherSecrets[v.Secret.SecretName] = append(c.otherSecrets[v.Secret.SecretName], o)
		}
	}
	for _, k := range []string{"token-signing-key", "token-ttl"} {
		if _, has := cfg[k]; has {
			c.errorf(o, "serve.yaml: %s without the token service", k)
		}
	}
	require, _ := cfg["require-token"].(bool)
	if require != c.e.Tokens {
		c.errorf(o, "serve.yaml: require-token %v, want %v (auth.enabled)", require, c.e.Tokens)
	}
	if !require {
		return
	}
	if err := checkSPIFFEID(str("token-issuer")); err != nil {
		c.errorf(o, "serve.yaml: token-issuer: %v", err)
	}
	if v, _ := mountAt(spec, ctr, str("token-public-key")); v == nil || (v.ConfigMap == nil && v.Secret == nil) {
		c.errorf(o, "token-public-key %q is not mounted", str("token-public-key"))
	}
}

// checkTokens asserts one token service when tokens are on, and that no other workload
// mounts its signing key: a server that could sign tokens could mint them for others.
func (c *checker) checkTokens() {
	if c.e.Tokens && c.tokenServices == 0 {
		c.errs = append(c.errs, errors.New("auth enabled, but no token service (veil serve --service auth) is rendered"))
	}
	for name := range c.signingSecrets {
		for _, o := range c.otherSecrets[name] {
			c.errorf(o, "mounts the token service's signing key (Secret %s)", name)
		}
	}
}

// parseGoMemLimit parses GOMEMLIMIT's syntax: bytes with an optional B, KiB, MiB, GiB
// or TiB suffix.
func parseGoMemLimit(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}
	mult := int64(1)
	for _, u := range units {
		if rest, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = rest, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("want a positive number of bytes with an optional B, KiB, MiB, GiB or TiB suffix")
	}
	return n * mult, nil
}
