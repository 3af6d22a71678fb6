package main

// The grpc_nginx system of the rpc suite: what a user runs instead of Veil when TLS is
// terminated by proxies beside the services (nginx, or a mesh sidecar). grpc-go client
// and server speak HTTP/2 without TLS (h2c) to an nginx on their own side; the two nginx
// talk mutual TLS 1.3 (X25519) to each other with grpc_pass and keepalive upstreams:
//
//	grpc-go client --h2c--> nginx (client side) --mTLS, grpcs--> nginx (server side) --h2c--> grpc-go server
//
// CPU per call counts the four parties: this process (client and server) and every
// nginx process (master and workers, from /proc/<pid>/stat).

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
)

// sidecarName is the server name the client-side nginx verifies on the server side's
// certificate.
const sidecarName = "echo.sidecar.bench"

// findNginx returns the nginx binary: on PATH, or where Debian's package puts it
// (/usr/sbin is not on every user's PATH). make bench installs nginx-light when neither
// has one.
func findNginx() (string, error) {
	if p, err := exec.LookPath("nginx"); err == nil {
		return p, nil
	}
	if st, err := os.Stat("/usr/sbin/nginx"); err == nil && !st.IsDir() {
		return "/usr/sbin/nginx", nil
	}
	return "", errors.New("nginx not found on PATH or in /usr/sbin (make bench installs Debian's nginx-light with apt-get when it can)")
}

// nginxProc is one running nginx (master and its workers).
type nginxProc struct {
	cmd *exec.Cmd
	dir string
}

// startNginx writes conf into dir and runs nginx in the foreground until stop.
func startNginx(bin, dir, conf string) (*nginxProc, error) {
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o777); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	test := exec.Command(bin, "-t", "-q", "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", path)
	if out, err := test.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("nginx -t: %v: %s", err, strings.TrimSpace(string(out)))
	}
	cmd := exec.Command(bin, "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", path, "-g", "daemon off;")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &nginxProc{cmd: cmd, dir: dir}, nil
}

func (n *nginxProc) stop() {
	_ = n.cmd.Process.Signal(syscall.SIGQUIT)
	done := make(chan struct{})
	go func() { _ = n.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

// cpu returns the CPU time (user and system) the master and its live workers have used.
func (n *nginxProc) cpu() time.Duration {
	master := n.cmd.Process.Pid
	total := procCPU(master)
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == master {
			continue
		}
		if ppid, t, ok := procStat(pid); ok && ppid == master {
			total += t
		}
	}
	return total
}

func procCPU(pid int) time.Duration {
	_, t, _ := procStat(pid)
	return t
}

// clockTick is the unit of /proc/<pid>/stat's times (USER_HZ, 100 on Linux).
const clockTick = 10 * time.Millisecond

// procStat reads a process's parent and CPU time (utime + stime) from /proc/<pid>/stat.
func procStat(pid int) (ppid int, cpu time.Duration, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(string(b[i+1:])) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, 0, false
	}
	ppid, _ = strconv.Atoi(f[1])
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	return ppid, time.Duration(ut+st) * clockTick, true
}

// sidecarPKI writes a CA and two certificates with DNS names for the nginx pair: the
// proxies verify host names, which Veil's SPIFFE certificates (URI names only) do not
// carry.
func sidecarPKI(dir string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sidecar bench CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, _ := x509.ParseCertificate(caDER)
	if err := writePEM(filepath.Join(dir, "ca.pem"), "CERTIFICATE", caDER); err != nil {
		return err
	}
	for i, leaf := range []struct {
		name string
		eku  x509.ExtKeyUsage
	}{{"server", x509.ExtKeyUsageServerAuth}, {"client", x509.ExtKeyUsageClientAuth}} {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		t := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: leaf.name + "." + sidecarName},
			DNSNames: []string{sidecarName}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{leaf.eku},
		}
		der, err := x509.CreateCertificate(rand.Reader, t, ca, &k.PublicKey, caKey)
		if err != nil {
			return err
		}
		kd, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, leaf.name+".pem"), "CERTIFICATE", der); err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, leaf.name+"-key.pem"), "PRIVATE KEY", kd); err != nil {
			return err
		}
	}
	return nil
}

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o644)
}

// nginxMain is the part of both configurations outside the http block: nginx's own
// files under its prefix, worker_processes auto (one per core, as a sidecar is sized).
const nginxMain = `worker_processes auto;
pid %[1]s/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  error_log %[1]s/error.log warn;
  client_body_temp_path %[1]s/tmp/body;
  proxy_temp_path %[1]s/tmp/proxy;
  fastcgi_temp_path %[1]s/tmp/fastcgi;
  uwsgi_temp_path %[1]s/tmp/uwsgi;
  scgi_temp_path %[1]s/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  http2_max_concurrent_streams 1024;
%[2]s
}
`

// startSidecars starts grpc-go's echo server on h2c, the server-side nginx (mutual TLS
// in, h2c out) and the client-side nginx (h2c in, mutual TLS out), and returns the
// client-side nginx's address and a CPU meter over both nginx.
func startSidecars(bin, dir string) (addr string, cpu func() time.Duration, stop func(), err error) {
	var stops []func()
	stop = func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}
	defer func() {
		if err != nil {
			stop()
		}
	}()
	if err = sidecarPKI(dir); err != nil {
		return "", nil, nil, err
	}
	gln, err := listen()
	if err != nil {
		return "", nil, nil, err
	}
	gs := grpc.NewServer()
	gs.RegisterService(&grpcEchoDesc, struct{}{})
	go func() { _ = gs.Serve(gln) }()
	stops = append(stops, gs.Stop)

	// Free ports for the two nginx: taken and released (nginx binds them itself).
	port := func() (string, error) {
		ln, err := listen()
		if err != nil {
			return "", err
		}
		defer func() { _ = ln.Close() }()
		return ln.Addr().String(), nil
	}
	srvAddr, err := port()
	if err != nil {
		return "", nil, nil, err
	}
	cliAddr, err := port()
	if err != nil {
		return "", nil, nil, err
	}
	serverConf := fmt.Sprintf(`  upstream app { server %[1]s; keepalive 256; keepalive_requests 1000000; keepalive_timeout 300s; }
  server {
    listen %[2]s ssl http2;
    ssl_protocols TLSv1.3;
    ssl_ecdh_curve X25519;
    ssl_certificate %[3]s/server.pem;
    ssl_certificate_key %[3]s/server-key.pem;
    ssl_client_certificate %[3]s/ca.pem;
    ssl_verify_client on;
    ssl_session_cache shared:tls:10m;
    location / { grpc_pass grpc://app; }
  }`, gln.Addr().String(), srvAddr, dir)
	clientConf := fmt.Sprintf(`  upstream mesh { server %[1]s; keepalive 256; keepalive_requests 1000000; keepalive_timeout 300s; }
  server {
    listen %[2]s http2;
    location / {
      grpc_pass grpcs://mesh;
      grpc_ssl_protocols TLSv1.3;
      grpc_ssl_certificate %[3]s/client.pem;
      grpc_ssl_certificate_key %[3]s/client-key.pem;
      grpc_ssl_trusted_certificate %[3]s/ca.pem;
      grpc_ssl_verify on;
      grpc_ssl_name %[4]s;
      grpc_ssl_server_name on;
      grpc_ssl_session_reuse on;
    }
  }`, srvAddr, cliAddr, dir, sidecarName)
	var procs []*nginxProc
	for _, c := range []struct{ sub, conf string }{{"server", serverConf}, {"client", clientConf}} {
		d := filepath.Join(dir, "nginx-"+c.sub)
		n, err := startNginx(bin, d, fmt.Sprintf(nginxMain, d, c.conf))
		if err != nil {
			return "", nil, nil, fmt.Errorf("%s-side nginx: %w", c.sub, err)
		}
		stops = append(stops, n.stop)
		procs = append(procs, n)
	}
	for _, a := range []string{srvAddr, cliAddr} {
		if err := waitListening(a); err != nil {
			return "", nil, nil, err
		}
	}
	cpu = func() time.Duration {
		var t time.Duration
		for _, n := range procs {
			t += n.cpu()
		}
		return t
	}
	return cliAddr, cpu, stop, nil
}

// waitListening waits until something accepts connections on addr.
func waitListening(addr string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			return c.Close()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nginx did not listen on %s: %w", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sidecarSystem is the grpc_nginx system, or a reason it is skipped.
func (e *env) sidecarSystem(msg string) (*unary, string) {
	bin, err := findNginx()
	if err != nil {
		return nil, err.Error()
	}
	dir := filepath.Join(e.dir, "sidecar")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err.Error()
	}
	// nginx's workers may run as another user (nobody, when started by root): they
	// open nothing under dir after start, but its temp folders must be theirs to write.
	_ = os.Chmod(e.dir, 0o755)
	addr, cpu, stop, err := startSidecars(bin, dir)
	if err != nil {
		return nil, err.Error()
	}
	gc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		stop()
		return nil, err.Error()
	}
	// The first call proves the chain end to end before the suite starts.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res := new(echov1.EchoResponse)
	if err := gc.Invoke(ctx, "/veil.echo.v1.EchoService/Echo", &echov1.EchoRequest{Message: msg}, res, grpc.WaitForReady(true)); err != nil {
		_ = gc.Close()
		stop()
		return nil, "grpc through the nginx pair failed: " + err.Error()
	}
	ver := "nginx"
	if out, err := exec.Command(bin, "-v").CombinedOutput(); err == nil {
		ver = strings.TrimPrefix(strings.TrimSpace(string(out)), "nginx version: ")
	}
	return &unary{
		sys: newSystem("grpc_nginx", "grpc-go "+moduleVersion("google.golang.org/grpc")+" on h2c behind two "+ver+" (mTLS 1.3 X25519 between them, grpc_pass, keepalive upstreams); CPU includes nginx"),
		call: func(ctx context.Context) error {
			res := new(echov1.EchoResponse)
			if err := gc.Invoke(ctx, "/veil.echo.v1.EchoService/Echo", &echov1.EchoRequest{Message: msg}, res); err != nil {
				return err
			}
			return check(res.GetMessage(), msg)
		},
		extCPU: cpu,
		stop:   func() { _ = gc.Close(); stop() },
	}, ""
}

// addCPU adds CPU used outside this process during the run to the per-call figures.
func (r *unaryResult) addCPU(d time.Duration) {
	if r.calls == 0 || r.wall == 0 {
		return
	}
	r.cpuPerCall += float64(d.Microseconds()) / r.calls
	r.coresUsed += d.Seconds() / r.wall.Seconds()
}

// sidecarRatios records Veil sealed against the nginx pair.
func sidecarRatios(rep *Report, v *System) {
	s := rep.system("grpc_nginx")
	rep.ratio("veil_vs_sidecar_calls_per_s", v, "calls_per_s", s, "calls_per_s")
	rep.ratio("veil_vs_sidecar_p99", v, "p99_ms", s, "p99_ms")
	rep.ratio("veil_vs_sidecar_cpu_per_call", v, "cpu_us_per_call", s, "cpu_us_per_call")
}
