package integration

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/moby/moby/client"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/testcontainers/testcontainers-go"

	echov1 "github.com/veilrpc/veil/gen/veil/echo/v1"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/transport"
)

// openFDs counts this process's open file descriptors (sockets included).
func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// settle waits for background goroutines and descriptors to wind down and returns
// their counts.
func settle(t *testing.T, hc interface{ CloseIdleConnections() }) (goroutines, fds int) {
	t.Helper()
	for range 50 {
		hc.CloseIdleConnections()
		runtime.GC()
		time.Sleep(100 * time.Millisecond)
	}
	return runtime.NumGoroutine(), openFDs(t)
}

// TestNetworkPartition disconnects the service's container from its network in the
// middle of steady calls: calls fail by their deadlines (never hang), the client leaks
// no goroutines or connections (measured), and calls succeed again after reconnecting.
func TestNetworkPartition(t *testing.T) {
	dir, _ := identities(t, "spiffe://example.org/echo", "spiffe://example.org/client")
	nw := newNetwork(t)
	c := startVeil(t, containerSpec{
		alias: "echo", network: nw, port: "8443/tcp",
		args:  []string{"/veil", "serve", "--identity", "/identity", "--listen", ":8443", "--service", "echo", "--allow", "spiffe://example.org/client"},
		files: identityFiles(dir, "echo"),
	})
	url := "https://" + c.endpoint(t, "8443/tcp")
	// Ping a silent connection after 1 s and drop it 1 s later if unanswered.
	hc := rpc.NewHTTPClient(loadSource(t, filepath.Join(dir, "client")),
		transport.AuthorizeID(spiffeid.RequireFromString("spiffe://example.org/echo")), rpc.WithKeepalive(time.Second, time.Second))
	ec := echov1connect.NewEchoServiceClient(hc, url, rpc.ClientOptions()...)
	call := func(timeout time.Duration) error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		_, err := ec.Echo(ctx, connect.NewRequest(&echov1.EchoRequest{Message: "ping"}))
		return err
	}
	docker, err := testcontainers.NewDockerClientWithOpts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer docker.Close()
	if _, err := docker.Ping(context.Background(), client.PingOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := call(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	baseG, baseFD := settle(t, hc.Transport.(interface{ CloseIdleConnections() }))
	// Keep one connection open across the partition, as a busy client would.
	if err := call(10 * time.Second); err != nil {
		t.Fatal(err)
	}

	id := c.Container.GetContainerID()
	if _, err := docker.NetworkDisconnect(context.Background(), nw, client.NetworkDisconnectOptions{Container: id, Force: true}); err != nil {
		t.Fatal(err)
	}
	reconnected := false
	defer func() {
		if !reconnected {
			_, _ = docker.NetworkConnect(context.Background(), nw, client.NetworkConnectOptions{Container: id})
		}
	}()

	// During the partition every call ends by its deadline with an error.
	var wg sync.WaitGroup
	errs := make([]error, 16)
	started := time.Now()
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = call(time.Second)
		}()
	}
	wg.Wait()
	if elapsed := time.Since(started); elapsed > 20*time.Second {
		t.Fatalf("calls during the partition took %s: deadlines did not fire", elapsed)
	}
	for i, err := range errs {
		if err == nil {
			t.Fatalf("call %d succeeded during the partition", i)
		}
		if code := connect.CodeOf(err); code != connect.CodeDeadlineExceeded && code != connect.CodeUnavailable {
			t.Fatalf("call %d: %v, want deadline_exceeded or unavailable", i, err)
		}
	}

	if _, err := docker.NetworkConnect(context.Background(), nw, client.NetworkConnectOptions{Container: id}); err != nil {
		t.Fatal(err)
	}
	reconnected = true
	// Docker publishes the port again on reconnection, possibly on another host port.
	ec = echov1connect.NewEchoServiceClient(hc, "https://"+c.endpoint(t, "8443/tcp"), rpc.ClientOptions()...)
	// Recovery: calls succeed again once the network is back.
	var last error
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if last = call(2 * time.Second); last == nil {
			break
		}
	}
	if last != nil {
		t.Fatalf("no recovery after reconnecting: %v", last)
	}
	g, fd := settle(t, hc.Transport.(interface{ CloseIdleConnections() }))
	t.Logf("goroutines %d -> %d, open descriptors %d -> %d", baseG, g, baseFD, fd)
	// A leaked connection holds a descriptor (and at least two goroutines: the HTTP/2
	// read loop and the write coalescer), so descriptors are compared exactly; one
	// goroutine of slack absorbs unrelated runtime and Docker-client housekeeping.
	if g > baseG+1 || fd > baseFD {
		t.Fatalf("leak: goroutines %d -> %d, open descriptors %d -> %d", baseG, g, baseFD, fd)
	}

}
