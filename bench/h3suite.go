package main

// The h3 suite: HTTP/3 (QUIC) against HTTP/2 (TCP) under packet loss. The servers run
// in a child process inside a network namespace the suite creates, reached through a
// router namespace; iptables there drops each forwarded packet with probability P
// (-m statistic --mode random). Systems: Veil sealed over h2 and over h3 (one
// server serving both), and the peer: plain connect-go over net/http's HTTP/2 and over
// quic-go's HTTP/3 (one handler on both). Loss levels and systems are interleaved.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"image/color"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/quic-go/quic-go/http3"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"

	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/echo"
	"github.com/veilrpc/veil/transport"
)

const (
	h3ServerCommand = "h3-server"
	h3StreamMiB     = 64
)

// h3Losses are the loss levels: the probability of dropping each packet.
var h3Losses = []struct {
	name string
	p    float64
}{{"loss0", 0}, {"loss1", 0.01}, {"loss5", 0.05}}

// extraCharts are charts a suite draws itself (report.go calls them).
var extraCharts = map[string]func(chartDir, rel string, r *Report, w func(string, ...any)) error{
	"h3": h3Chart,
}

// h3Addrs is what the server process prints once it listens.
type h3Addrs struct {
	Veil    string `json:"veil"`    // Veil, sealed, h2 on TCP and h3 on UDP
	Connect string `json:"connect"` // connect-go: net/http h2 on TCP, quic-go h3 on UDP
}

// netns is the suite's network: the servers' namespace behind a router namespace,
// reached over two veth pairs. Loss is applied in the router's FORWARD chain, so no
// sender sees its own packet refused (iptables in OUTPUT makes sendmsg fail with EPERM,
// which a QUIC stack rightly takes as a broken socket rather than as loss).
type netns struct {
	router, server string
	peer           string // the servers' address
}

func runCmd(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// newNetns makes 10.213.N.1 (here) - 10.213.N.2 (router) and 10.214.N.1 (router) -
// 10.214.N.2 (servers).
func newNetns() (*netns, error) {
	pid := os.Getpid()
	id := pid % 200
	n := &netns{router: fmt.Sprintf("veilbench%dr", pid), server: fmt.Sprintf("veilbench%ds", pid), peer: fmt.Sprintf("10.214.%d.2", id)}
	a, b := fmt.Sprintf("vb%da", pid%100000), fmt.Sprintf("vb%db", pid%100000)
	c, d := fmt.Sprintf("vb%dc", pid%100000), fmt.Sprintf("vb%dd", pid%100000)
	inR := func(args ...string) []string { return append([]string{"ip", "netns", "exec", n.router}, args...) }
	inS := func(args ...string) []string { return append([]string{"ip", "netns", "exec", n.server}, args...) }
	steps := [][]string{
		{"ip", "netns", "add", n.router},
		{"ip", "netns", "add", n.server},
		{"ip", "link", "add", a, "type", "veth", "peer", "name", b},
		{"ip", "link", "set", b, "netns", n.router},
		{"ip", "addr", "add", fmt.Sprintf("10.213.%d.1/24", id), "dev", a},
		{"ip", "link", "set", a, "up"},
		{"ip", "route", "add", fmt.Sprintf("10.214.%d.0/24", id), "via", fmt.Sprintf("10.213.%d.2", id)},
		inR("ip", "addr", "add", fmt.Sprintf("10.213.%d.2/24", id), "dev", b),
		inR("ip", "link", "set", b, "up"),
		inR("ip", "link", "add", c, "type", "veth", "peer", "name", d),
		inR("ip", "link", "set", d, "netns", n.server),
		inR("ip", "addr", "add", fmt.Sprintf("10.214.%d.1/24", id), "dev", c),
		inR("ip", "link", "set", c, "up"),
		inR("sysctl", "-q", "-w", "net.ipv4.ip_forward=1"),
		inS("ip", "addr", "add", n.peer+"/24", "dev", d),
		inS("ip", "link", "set", d, "up"),
		inS("ip", "link", "set", "lo", "up"),
		inS("ip", "route", "add", "default", "via", fmt.Sprintf("10.214.%d.1", id)),
		inR("iptables", "-L", "FORWARD", "-n"), // iptables works in it
	}
	for _, s := range steps {
		if err := runCmd(s...); err != nil {
			n.close()
			return nil, err
		}
	}
	return n, nil
}

// close deletes both namespaces: their veth ends, and with them the pairs and the route.
func (n *netns) close() {
	_ = runCmd("ip", "netns", "del", n.router)
	_ = runCmd("ip", "netns", "del", n.server)
}

// setLoss drops each packet the router forwards, either way, with probability p.
func (n *netns) setLoss(p float64) error {
	if err := runCmd("ip", "netns", "exec", n.router, "iptables", "-F", "FORWARD"); err != nil {
		return err
	}
	if p == 0 {
		return nil
	}
	return runCmd("ip", "netns", "exec", n.router, "iptables", "-A", "FORWARD", "-m", "statistic", "--mode", "random",
		"--probability", strconv.FormatFloat(p, 'f', -1, 64), "-j", "DROP")
}

// childCPU reads a process's CPU time from /proc (clock ticks of 10 ms).
func childCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:]) // fields from the 3rd on
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

func h3Suite(cfg *config) (*Report, error) {
	e, err := newEnv()
	if err != nil {
		return nil, err
	}
	defer e.close()
	rep := newReport("h3")
	ns, nsErr := newNetns()
	host := "127.0.0.1"
	losses := h3Losses
	if nsErr != nil {
		msg := fmt.Sprintf("h3: no network namespace (%v): loss levels skipped, HTTP/3 against HTTP/2 on loopback only", nsErr)
		fmt.Fprintln(os.Stderr, msg)
		rep.Notes = append(rep.Notes, msg)
		losses = losses[:1]
	} else {
		defer ns.close()
		host = ns.peer
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := []string{exe, h3ServerCommand, "--dir", e.dir, "--host", host}
	if ns != nil {
		args = append([]string{"ip", "netns", "exec", ns.server}, args...)
	}
	child := exec.Command(args[0], args[1:]...)
	child.Stderr = os.Stderr
	stdin, err := child.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := child.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := child.Start(); err != nil {
		return nil, err
	}
	defer func() { _ = stdin.Close(); _ = child.Wait() }()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		return nil, fmt.Errorf("h3 server: %w", err)
	}
	var addrs h3Addrs
	if err := json.Unmarshal([]byte(line), &addrs); err != nil {
		return nil, fmt.Errorf("h3 server said %q: %w", line, err)
	}

	msg := strings.Repeat("v", cfg.msgSize)
	type system struct {
		sys      *System
		call     func(context.Context) error
		download func(context.Context) (int64, error) // nil: no stream figure
		close    func()
	}
	sealed := veilOptions{sealed: true, coalesce: true}
	vh2, err := e.veilClient(sealed)
	if err != nil {
		return nil, err
	}
	vh3, err := e.veilClient(sealed, rpc.WithHTTP3())
	if err != nil {
		return nil, err
	}
	ch2 := e.connectClient()
	ch3 := &http.Client{Transport: &http3.Transport{TLSClientConfig: e.clientTLS()}}
	count := uint32(h3StreamMiB << 20 / streamChunkSize)
	veilURL, connectURL := "https://"+addrs.Veil, "https://"+addrs.Connect
	peerOpts := []connect.ClientOption{connect.WithAcceptCompression("gzip", nil, nil)}
	systems := []system{
		{newSystem("veil_h2", "Veil, PQ sealing strict, HTTP/2 over TCP"), connectCall(echov1connect.NewEchoServiceClient(vh2, veilURL, rpc.ClientOptions()...), msg),
			connectDownload(vh2, veilURL, count, rpc.ClientOptions()...), vh2.CloseIdleConnections},
		{newSystem("veil_h3", "Veil, PQ sealing strict, HTTP/3 over QUIC (quic-go "+moduleVersion("github.com/quic-go/quic-go")+")"), connectCall(echov1connect.NewEchoServiceClient(vh3, veilURL, rpc.ClientOptions()...), msg),
			connectDownload(vh3, veilURL, count, rpc.ClientOptions()...), vh3.CloseIdleConnections},
		{newSystem("connect_h2", "connect-go "+moduleVersion("connectrpc.com/connect")+", net/http HTTP/2, mTLS, unsealed"), connectCall(echov1connect.NewEchoServiceClient(ch2, connectURL, peerOpts...), msg), nil, ch2.CloseIdleConnections},
		{newSystem("quicgo_h3", "connect-go over quic-go "+moduleVersion("github.com/quic-go/quic-go")+" http3, mTLS, unsealed"), connectCall(echov1connect.NewEchoServiceClient(ch3, connectURL, peerOpts...), msg), nil, ch3.CloseIdleConnections},
	}
	defer func() {
		for _, s := range systems {
			s.close()
		}
	}()
	systems = selected(cfg, systems, func(s system) (string, func()) { return s.sys.Name, s.close })
	for _, s := range systems {
		if _, err := runUnary(s.call, cfg.conc, cfg.warmup); err != nil {
			return nil, fmt.Errorf("%s warm-up: %w", s.sys.Name, err)
		}
	}
	pid := child.Process.Pid
	for range cfg.reps {
		for _, l := range losses {
			if ns != nil {
				if err := ns.setLoss(l.p); err != nil {
					return nil, err
				}
			}
			for _, s := range systems {
				runtime.GC()
				c0 := childCPU(pid)
				r, err := runUnary(s.call, cfg.conc, cfg.dur)
				if err != nil {
					return nil, fmt.Errorf("%s %s: %w", s.sys.Name, l.name, err)
				}
				cpu := r.cpuPerCall + float64((childCPU(pid)-c0).Microseconds())/r.calls
				s.sys.add("calls_per_s_"+l.name, r.callsPerS)
				s.sys.add("p50_ms_"+l.name, r.p50)
				s.sys.add("p99_ms_"+l.name, r.p99)
				s.sys.add("p999_ms_"+l.name, r.p999)
				s.sys.add("cpu_us_per_call_"+l.name, cpu)
				cfg.logf("h3 %-10s %s %8.0f calls/s p50 %.2f p99 %.2f p99.9 %.2f ms cpu %.1f us/call", s.sys.Name, l.name, r.callsPerS, r.p50, r.p99, r.p999, cpu)
				if s.download == nil {
					continue
				}
				m := startMeter()
				n, err := s.download(context.Background())
				wall, _, _ := m.stop()
				if err != nil {
					return nil, fmt.Errorf("%s %s stream: %w", s.sys.Name, l.name, err)
				}
				if want := int64(count) * streamChunkSize; n != want {
					return nil, fmt.Errorf("%s: received %d bytes, want %d", s.sys.Name, n, want)
				}
				s.sys.add("stream_mb_per_s_"+l.name, float64(n)/1e6/wall.Seconds())
				cfg.logf("h3 %-10s %s stream %.1f MB/s", s.sys.Name, l.name, float64(n)/1e6/wall.Seconds())
			}
		}
	}
	if ns != nil {
		_ = ns.setLoss(0)
	}
	where := "veth pairs through a router namespace into the servers' namespace; iptables in the router's FORWARD chain drops each packet, either way, with probability P (loss0/1/5: P = 0, 1%, 5%)"
	if ns == nil {
		where = "loopback (no network namespace: no loss levels)"
	}
	rep.Config = map[string]any{
		"message_bytes": cfg.msgSize, "concurrency": cfg.conc, "seconds_per_rep": cfg.dur.Seconds(), "reps": cfg.reps,
		"mib_per_stream": h3StreamMiB, "path": where,
		"servers": "a child process in the namespace: Veil (sealed, WithHTTP3: h2 and h3 on one port) and connect-go (net/http h2 and quic-go http3 on one port); CPU per call is both processes'",
		"tls":     "TLS 1.3 mutual, X25519MLKEM768, in the TCP and the QUIC handshake",
	}
	for _, s := range systems {
		rep.Systems = append(rep.Systems, s.sys)
	}
	h2, h3 := rep.system("veil_h2"), rep.system("veil_h3")
	rep.ratio("h3_vs_h2_calls_per_s", h3, "calls_per_s_loss0", h2, "calls_per_s_loss0")
	rep.ratio("h3_vs_h2_cpu_per_call", h3, "cpu_us_per_call_loss0", h2, "cpu_us_per_call_loss0")
	rep.ratio("h3_vs_h2_p99_loss0", h3, "p99_ms_loss0", h2, "p99_ms_loss0")
	rep.ratio("quicgo_vs_connect_h2_cpu_per_call", rep.system("quicgo_h3"), "cpu_us_per_call_loss0", rep.system("connect_h2"), "cpu_us_per_call_loss0")
	if ns != nil {
		rep.ratio("h3_vs_h2_p99_loss1", h3, "p99_ms_loss1", h2, "p99_ms_loss1")
		rep.ratio("h3_vs_h2_p99_loss5", h3, "p99_ms_loss5", h2, "p99_ms_loss5")
		rep.ratio("h3_vs_h2_p999_loss5", h3, "p999_ms_loss5", h2, "p999_ms_loss5")
		rep.ratio("h3_vs_h2_calls_per_s_loss5", h3, "calls_per_s_loss5", h2, "calls_per_s_loss5")
		rep.ratio("h3_vs_h2_stream_mb_per_s_loss5", h3, "stream_mb_per_s_loss5", h2, "stream_mb_per_s_loss5")
		rep.ratio("quicgo_vs_connect_h2_p99_loss5", rep.system("quicgo_h3"), "p99_ms_loss5", rep.system("connect_h2"), "p99_ms_loss5")
	}
	return rep, nil
}

// h3ServerMain is the server process: it serves until its stdin closes.
func h3ServerMain(args []string) {
	var dir, host string
	for i := 0; i+1 < len(args); i += 2 {
		switch args[i] {
		case "--dir":
			dir = args[i+1]
		case "--host":
			host = args[i+1]
		}
	}
	if dir == "" || host == "" {
		fatal(errors.New("h3-server: --dir and --host are required"))
	}
	listenHost = host
	e, err := loadEnv(dir)
	if err != nil {
		fatal(err)
	}
	vs, err := e.startVeilWith(veilOptions{sealed: true, coalesce: true}, nil, rpc.WithHTTP3())
	if err != nil {
		fatal(err)
	}
	defer vs.stop()
	// connect-go on one port: net/http serves h2 on TCP, quic-go http3 on UDP.
	ln, err := listen()
	if err != nil {
		fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(echov1connect.NewEchoServiceHandler(echo.New(), connect.WithCompression("gzip", nil, nil)))
	mux.Handle(downloadHandler(connect.WithCompression("gzip", nil, nil)))
	hs := &http.Server{Handler: mux, TLSConfig: e.serverTLS(), ErrorLog: discardLog()}
	go func() { _ = hs.ServeTLS(ln, "", "") }()
	defer hs.Close()
	udp, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ln.Addr().(*net.TCPAddr).AddrPort()))
	if err != nil {
		fatal(err)
	}
	h3 := &http3.Server{Handler: mux, TLSConfig: http3.ConfigureTLSConfig(e.serverTLS())}
	go func() { _ = h3.Serve(udp) }()
	defer h3.Close()
	b, _ := json.Marshal(h3Addrs{Veil: vs.addr, Connect: ln.Addr().String()})
	fmt.Println(string(b))
	_, _ = bufio.NewReader(os.Stdin).ReadString(0) // until the suite closes stdin
}

// loadEnv reopens the identities newEnv issued in dir (the server process's view).
func loadEnv(dir string) (*env, error) {
	e := &env{dir: dir}
	name := func(id string) string {
		return filepath.Join(dir, strings.NewReplacer("spiffe://", "", "/", "_").Replace(id))
	}
	e.serverDir, e.clientDir = name(serverID), name(clientID)
	var err error
	if e.serverSrc, err = transport.LoadFiles(e.serverDir); err != nil {
		return nil, err
	}
	if e.clientSrc, err = transport.LoadFiles(e.clientDir); err != nil {
		return nil, err
	}
	return e, nil
}

// h3Chart draws p99 latency against loss for each system (PNG) and the same as an
// ASCII table-chart in the report.
func h3Chart(chartDir, rel string, r *Report, w func(string, ...any)) error {
	p := plot.New()
	p.Title.Text = "h3: p99 latency of 1 KiB unary calls (64 callers) against packet loss"
	p.X.Label.Text = "packet loss (%)"
	p.Y.Label.Text = "p99 (ms)"
	p.Legend.Top = true
	colors := []color.RGBA{{200, 30, 30, 255}, {30, 90, 200, 255}, {230, 140, 20, 255}, {40, 160, 80, 255}}
	var rows []string
	for i, s := range r.Systems {
		var pts plotter.XYs
		row := fmt.Sprintf("%-11s", s.Name)
		for _, l := range h3Losses {
			v := s.Median("p99_ms_" + l.name)
			if len(s.samples["p99_ms_"+l.name]) == 0 {
				continue
			}
			pts = append(pts, plotter.XY{X: l.p * 100, Y: v})
			row += fmt.Sprintf(" | %5.1f%% %8.2f ms %s", l.p*100, v, strings.Repeat("#", min(60, int(v/5)+1)))
		}
		rows = append(rows, row)
		line, err := plotter.NewLine(pts)
		if err != nil {
			return err
		}
		line.Color = colors[i%len(colors)]
		line.Width = vg.Points(2)
		p.Add(line)
		p.Legend.Add(s.Name, line)
	}
	name := "h3_p99_vs_loss.png"
	if err := p.Save(8*vg.Inch, 4.5*vg.Inch, filepath.Join(chartDir, name)); err != nil {
		return err
	}
	w("![h3 p99 against loss](%s)\n\np99 against loss (one # per 5 ms):\n\n```\n%s\n```\n\n", filepath.ToSlash(filepath.Join(rel, name)), strings.Join(rows, "\n"))
	return nil
}
