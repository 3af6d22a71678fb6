package deploycheck

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
)

// TestDocker runs the rendered CA and services in Docker the way the kubelet would run
// them: the rendered args, env, user, read-only root filesystem, no capabilities, no
// privilege escalation, and each volume mounted at its rendered path (emptyDirs as
// tmpfs, ConfigMaps from the rendering, Secrets and the CA's claim from host
// directories). It then emulates the probes (TCP on the service port, GET /metrics) and
// shows the veil-ca limitation: a restarted container cannot reuse its join token. With
// a nats-server from make nats, it also runs scoring on state nats against a JetStream
// server that verifies the workload's certificate.
// It needs Docker (no registry: the image is built FROM scratch), as make test does; a
// missing engine is a failure, not a skip. -short skips it for quick local runs.
func TestDocker(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	if err := exec.Command("docker", "info").Run(); err != nil {
		t.Fatal("no Docker engine (make test needs one):", err)
	}
	root, _ := filepath.Abs("../../..")
	work := t.TempDir()
	if err := os.Chmod(work, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx := filepath.Join(work, "image")
	must(t, os.MkdirAll(ctx, 0o755))
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(ctx, "veil"), "./cmd/veil")
	build.Dir, build.Env = root, append(os.Environ(), "CGO_ENABLED=0")
	run(t, build)
	dockerfile, err := os.ReadFile(filepath.Join(root, "deploy/Dockerfile"))
	must(t, err)
	must(t, os.WriteFile(filepath.Join(ctx, "Dockerfile"), dockerfile, 0o644))
	image := fmt.Sprintf("veil-deploycheck:%d", time.Now().UnixNano())
	run(t, exec.Command("docker", "build", "-q", "-t", image, ctx))
	t.Cleanup(func() { _ = exec.Command("docker", "rmi", "-f", image).Run() })
	network := strings.ReplaceAll(strings.TrimPrefix(image, "veil-deploycheck:"), ":", "")
	network = "veil-deploycheck-" + network
	run(t, exec.Command("docker", "network", "create", network))
	t.Cleanup(func() { _ = exec.Command("docker", "network", "rm", network).Run() })

	objs := render(t, "veil-ca")
	caDir := hostDir(t, work, "ca-claim", 0o770)
	d := &dockerRun{t: t, image: image, network: network, objs: objs, work: work}

	// The CA: the pre-install Job, then the Deployment, with the claim from a host directory.
	d.volumes = map[string]string{"ca": caDir}
	d.job("veil-ca-init")
	caURL := "veil-ca.veil.svc" // the name in serve.yaml's ca URL
	d.start("veil-ca", caURL)

	// veil-ca mode: the bundle out of the claim, a join token from veil ca token in the CA's container.
	// docker cp reads files without a shell in the container (kubectl cp cannot: it needs tar).
	bundleDir := hostDir(t, work, "bundle", 0o755)
	d.copyOut("veil-ca", "/var/lib/veil/ca/ca/bundle.crt", filepath.Join(bundleDir, "bundle.crt"))
	tokenDir := hostDir(t, work, "token", 0o755)
	mint := func() {
		out := run(t, exec.Command("docker", "exec", d.name("veil-ca"), "/veil", "ca", "token", "--dir", "/var/lib/veil/ca/ca",
			"--id", "spiffe://example.org/ns/veil/sa/veil-scoring"))
		must(t, os.WriteFile(filepath.Join(tokenDir, "token"), out, 0o444))
	}
	mint()
	modelDir := hostDir(t, work, "model", 0o755)
	m, err := os.ReadFile("testdata/model.json")
	must(t, err)
	must(t, os.WriteFile(filepath.Join(modelDir, "model.json"), m, 0o444))
	d.volumes = map[string]string{"ca-bundle": bundleDir, "join-token": tokenDir, "model": modelDir}
	d.start("veil-scoring", "")

	// A restart needs a new token: the old one was used.
	run(t, exec.Command("docker", "restart", d.name("veil-scoring")))
	if logs := d.waitExit("veil-scoring"); !strings.Contains(logs, "the join token was already used") {
		t.Fatalf("restarted veil-scoring: want 'the join token was already used', got:\n%s", logs)
	}
	mint()
	run(t, exec.Command("docker", "start", d.name("veil-scoring")))
	d.ready("veil-scoring")

	// cert-manager mode: the identity Secret as files (what cert-manager writes).
	d.objs = render(t, "cert-manager")
	idDir := hostDir(t, work, "identity", 0o755)
	run(t, exec.Command("docker", "exec", d.name("veil-ca"), "/veil", "ca", "issue", "--dir", "/var/lib/veil/ca/ca",
		"--id", "spiffe://example.org/ns/veil/sa/veil-analytics", "--out", "/var/lib/veil/ca/issued"))
	for _, f := range []string{"tls.crt", "tls.key", "ca.crt"} {
		d.copyOut("veil-ca", "/var/lib/veil/ca/issued/"+f, filepath.Join(idDir, f))
	}
	d.volumes = map[string]string{"identity": idDir}
	d.start("veil-analytics", "")

	// state nats: scoring with its state in JetStream on a NATS server (make nats builds
	// the pinned nats-server into .cache/nats) that verifies the workload's certificate.
	natsBins, _ := filepath.Glob(filepath.Join(root, ".cache/nats/*/nats-server"))
	if len(natsBins) == 0 {
		t.Log("no nats-server in .cache/nats (make nats): state nats not run")
		return
	}
	natsCtx := hostDir(t, work, "nats-image", 0o755)
	bin, err := os.ReadFile(natsBins[0])
	must(t, err)
	must(t, os.WriteFile(filepath.Join(natsCtx, "nats-server"), bin, 0o755))
	must(t, os.WriteFile(filepath.Join(natsCtx, "Dockerfile"), []byte("FROM scratch\nCOPY nats-server /nats-server\nUSER 65532:65532\nENTRYPOINT [\"/nats-server\"]\n"), 0o644))
	natsImage := image + "-nats"
	run(t, exec.Command("docker", "build", "-q", "-t", natsImage, natsCtx))
	t.Cleanup(func() { _ = exec.Command("docker", "rmi", "-f", natsImage).Run() })
	natsDir := hostDir(t, work, "nats", 0o755)
	run(t, exec.Command("docker", "exec", d.name("veil-ca"), "/veil", "ca", "issue", "--dir", "/var/lib/veil/ca/ca",
		"--id", "spiffe://example.org/nats", "--dns", "nats", "--out", "/var/lib/veil/ca/nats"))
	for _, f := range []string{"tls.crt", "tls.key", "ca.crt"} {
		d.copyOut("veil-ca", "/var/lib/veil/ca/nats/"+f, filepath.Join(natsDir, f))
	}
	must(t, os.WriteFile(filepath.Join(natsDir, "nats.conf"), []byte(`listen: "0.0.0.0:4222"
tls {
  cert_file: "/etc/nats/tls.crt"
  key_file: "/etc/nats/tls.key"
  ca_file: "/etc/nats/ca.crt"
  verify: true
}
jetstream {
  store_dir: "/data/jetstream"
  max_memory_store: 64MB
  max_file_store: 256MB
}
`), 0o444))
	natsName := d.name("nats")
	run(t, exec.Command("docker", "run", "-d", "--name", natsName, "--network", network, "--network-alias", "nats",
		"--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/data:uid=65532,gid=65532,mode=0770",
		"--mount", "type=bind,src="+natsDir+",dst=/etc/nats,readonly", natsImage, "-c", "/etc/nats/nats.conf"))
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := exec.Command("docker", "logs", natsName).CombinedOutput()
			t.Logf("nats logs:\n%s", out)
		}
		_ = exec.Command("docker", "rm", "-f", natsName).Run()
	})
	// One JetStream node: replication 1. The url is the chart's default, tls://nats:4222.
	d.objs = renderScenario(t, Scenario{Name: "docker-cert-manager-nats",
		Set: []string{"identity.mode=cert-manager", "state.backend=nats", "state.replicas=1"}})
	scoringID := hostDir(t, work, "identity-scoring", 0o755)
	run(t, exec.Command("docker", "exec", d.name("veil-ca"), "/veil", "ca", "issue", "--dir", "/var/lib/veil/ca/ca",
		"--id", "spiffe://example.org/ns/veil/sa/veil-scoring", "--out", "/var/lib/veil/ca/scoring"))
	for _, f := range []string{"tls.crt", "tls.key", "ca.crt"} {
		d.copyOut("veil-ca", "/var/lib/veil/ca/scoring/"+f, filepath.Join(scoringID, f))
	}
	d.volumes = map[string]string{"identity": scoringID, "model": modelDir}
	run(t, exec.Command("docker", "rm", "-f", d.name("veil-scoring"))) // the veil-ca mode one
	d.start("veil-scoring", "")
	logs, _ := exec.Command("docker", "logs", d.name("veil-scoring")).CombinedOutput()
	if !strings.Contains(string(logs), `msg="shared state on NATS JetStream" url=tls://nats:4222`) {
		t.Errorf("veil-scoring with state nats did not report its NATS connection:\n%s", logs)
	}
}

type dockerRun struct {
	t       *testing.T
	image   string
	network string
	objs    []Object
	work    string
	volumes map[string]string // volume name -> host directory, for Secrets and claims
}

func (d *dockerRun) name(object string) string { return d.network + "-" + object }

func (d *dockerRun) podSpec(kind, name string) corev1.PodSpec {
	for _, o := range d.objs {
		if o.Kind == kind && o.Name == name {
			if dep, ok := o.Value.(*appsv1.Deployment); ok {
				return dep.Spec.Template.Spec
			}
		}
	}
	d.t.Fatalf("no %s %s rendered", kind, name)
	return corev1.PodSpec{}
}

func jobSpec(o Object) corev1.PodSpec { return o.Value.(*batchv1.Job).Spec.Template.Spec }

// dockerArgs translates a pod's single container into docker run flags.
func (d *dockerRun) dockerArgs(spec corev1.PodSpec, name string) []string {
	t := d.t
	ctr := spec.Containers[0]
	sc, psc := ctr.SecurityContext, spec.SecurityContext
	uid, gid := *psc.RunAsUser, *psc.RunAsGroup
	if sc.RunAsUser != nil {
		uid = *sc.RunAsUser
	}
	args := []string{"--name", d.name(name), "--network", d.network, "--user", fmt.Sprintf("%d:%d", uid, gid)}
	if psc.FSGroup != nil {
		args = append(args, "--group-add", fmt.Sprint(*psc.FSGroup))
	}
	if sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem {
		args = append(args, "--read-only")
	}
	for _, c := range sc.Capabilities.Drop {
		args = append(args, "--cap-drop", string(c))
	}
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		args = append(args, "--security-opt", "no-new-privileges")
	}
	if lim, ok := ctr.Resources.Limits[corev1.ResourceMemory]; ok {
		args = append(args, "--memory", fmt.Sprint(lim.Value()))
	}
	for _, e := range ctr.Env {
		args = append(args, "-e", e.Name+"="+e.Value)
	}
	for _, p := range ctr.Ports {
		args = append(args, "-p", fmt.Sprintf("127.0.0.1::%d", p.ContainerPort))
	}
	for _, m := range ctr.VolumeMounts {
		var vol *corev1.Volume
		for i := range spec.Volumes {
			if spec.Volumes[i].Name == m.Name {
				vol = &spec.Volumes[i]
			}
		}
		if vol == nil {
			t.Fatalf("%s: mount %s has no volume", name, m.Name)
		}
		ro := ""
		if m.ReadOnly {
			ro = ",readonly"
		}
		switch {
		case vol.EmptyDir != nil:
			args = append(args, "--tmpfs", fmt.Sprintf("%s:uid=%d,gid=%d,mode=0770", m.MountPath, uid, gid))
			continue
		case vol.ConfigMap != nil && d.configMap(vol.ConfigMap.Name) != nil:
			dir := hostDir(t, d.work, "cm-"+name+"-"+m.Name, 0o755)
			for k, v := range d.configMap(vol.ConfigMap.Name).Data {
				must(t, os.WriteFile(filepath.Join(dir, k), []byte(v), 0o444))
			}
			src := dir
			if m.SubPath != "" {
				src = filepath.Join(dir, m.SubPath)
			}
			args = append(args, "--mount", "type=bind,src="+src+",dst="+m.MountPath+ro)
			continue
		}
		dir, ok := d.volumes[m.Name]
		if !ok {
			t.Fatalf("%s: no host directory for volume %s", name, m.Name)
		}
		args = append(args, "--mount", "type=bind,src="+dir+",dst="+m.MountPath+ro)
	}
	return append(append(args, d.image), ctr.Args...)
}

// copyOut copies a file out of a container and makes it readable by the containers' user.
func (d *dockerRun) copyOut(name, src, dst string) {
	run(d.t, exec.Command("docker", "cp", d.name(name)+":"+src, dst))
	must(d.t, os.Chmod(dst, 0o444))
}

func (d *dockerRun) configMap(name string) *corev1.ConfigMap {
	for _, o := range d.objs {
		if cm, ok := o.Value.(*corev1.ConfigMap); ok && cm.Name == name {
			return cm
		}
	}
	return nil
}

func (d *dockerRun) job(name string) {
	for _, o := range d.objs {
		if o.Kind == "Job" && o.Name == name {
			spec := jobSpec(o)
			run(d.t, exec.Command("docker", append([]string{"run", "--rm"}, d.dockerArgs(spec, name)...)...))
			return
		}
	}
	d.t.Fatalf("no Job %s rendered", name)
}

// start runs a Deployment's pod and waits until it is ready by the rendered probes.
func (d *dockerRun) start(name, alias string) {
	spec := d.podSpec("Deployment", name)
	args := []string{"run", "-d"}
	if alias != "" {
		args = append(args, "--network-alias", alias)
	}
	run(d.t, exec.Command("docker", append(args, d.dockerArgs(spec, name)...)...))
	d.t.Cleanup(func() {
		if d.t.Failed() {
			out, _ := exec.Command("docker", "logs", d.name(name)).CombinedOutput()
			d.t.Logf("%s logs:\n%s", name, out)
		}
		_ = exec.Command("docker", "rm", "-f", d.name(name)).Run()
	})
	d.ready(name)
}

// ready emulates the rendered readiness (TCP) and liveness (GET /metrics) probes.
func (d *dockerRun) ready(name string) {
	spec := d.podSpec("Deployment", name)
	ctr := spec.Containers[0]
	hostPort := func(port string) string {
		for _, p := range ctr.Ports {
			if p.Name == port || fmt.Sprint(p.ContainerPort) == port {
				out := run(d.t, exec.Command("docker", "port", d.name(name), fmt.Sprint(p.ContainerPort)))
				return strings.TrimSpace(strings.Split(string(out), "\n")[0])
			}
		}
		d.t.Fatalf("%s: no port %s", name, port)
		return ""
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		err := func() error {
			c, err := net.DialTimeout("tcp", hostPort(ctr.ReadinessProbe.TCPSocket.Port.String()), time.Second)
			if err != nil {
				return err
			}
			_ = c.Close()
			resp, err := http.Get("http://" + hostPort(ctr.LivenessProbe.HTTPGet.Port.String()) + ctr.LivenessProbe.HTTPGet.Path)
			if err != nil {
				return err
			}
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("liveness: HTTP %d", resp.StatusCode)
			}
			return nil
		}()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			out, _ := exec.Command("docker", "logs", d.name(name)).CombinedOutput()
			d.t.Fatalf("%s not ready: %v\n%s", name, err, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// waitExit waits for a container to stop and returns its logs.
func (d *dockerRun) waitExit(name string) string {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		out, _ := exec.Command("docker", "inspect", "-f", "{{.State.Running}}", d.name(name)).Output()
		if strings.TrimSpace(string(out)) == "false" {
			break
		}
		time.Sleep(300 * time.Millisecond)
	}
	out, _ := exec.Command("docker", "logs", "--tail", "3", d.name(name)).CombinedOutput()
	return string(out)
}

func hostDir(t *testing.T, work, name string, mode os.FileMode) string {
	dir := filepath.Join(work, name)
	must(t, os.MkdirAll(dir, mode))
	must(t, os.Chmod(dir, mode))
	// The containers run as 65532; the test may run as root or as anyone.
	if os.Getuid() == 0 {
		must(t, os.Chown(dir, 65532, 65532))
	} else if mode&0o002 == 0 && mode&0o020 != 0 {
		must(t, os.Chmod(dir, mode|0o007))
	}
	return dir
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func run(t *testing.T, cmd *exec.Cmd) []byte {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v: %v\n%s%s", cmd.Args, err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.Bytes()
}
