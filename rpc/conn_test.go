package rpc

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// tcpPair returns a coalescing client end and the plain server end of a loopback TCP
// connection.
func tcpPair(t *testing.T) (*coalescingConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	c, err := coalescingDial(&net.Dialer{})(t.Context(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*coalescingConn), s
}

// Concurrent Writes arrive whole and, per writer, in order.
func TestCoalescingKeepsWritesWholeAndOrdered(t *testing.T) {
	c, s := tcpPair(t)
	const writers, each = 16, 500
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				// A record: writer, sequence, then a payload of varying size.
				n := 1 + (i*37+w)%3000
				rec := make([]byte, 12+n)
				binary.BigEndian.PutUint32(rec[0:], uint32(w))
				binary.BigEndian.PutUint32(rec[4:], uint32(i))
				binary.BigEndian.PutUint32(rec[8:], uint32(n))
				for j := range n {
					rec[12+j] = byte(w + i + j)
				}
				if _, err := c.Write(rec); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	done := make(chan error, 1)
	go func() {
		next := make([]int, writers)
		hdr := make([]byte, 12)
		for range writers * each {
			if _, err := io.ReadFull(s, hdr); err != nil {
				done <- err
				return
			}
			w, i, n := binary.BigEndian.Uint32(hdr), int(binary.BigEndian.Uint32(hdr[4:])), int(binary.BigEndian.Uint32(hdr[8:]))
			if w >= writers || i != next[w] {
				done <- fmt.Errorf("record %d of writer %d, want %d", i, w, next[w])
				return
			}
			next[w]++
			body := make([]byte, n)
			if _, err := io.ReadFull(s, body); err != nil {
				done <- err
				return
			}
			for j := range n {
				if body[j] != byte(int(w)+i+j) {
					done <- fmt.Errorf("writer %d record %d byte %d corrupted", w, i, j)
					return
				}
			}
		}
		done <- nil
	}()
	wg.Wait()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// Close sends what Writes accepted before it, then the peer reads EOF.
func TestCoalescingCloseSendsPending(t *testing.T) {
	c, s := tcpPair(t)
	want := bytes.Repeat([]byte("veil"), 100_000) // more than maxPending: Write waits for room
	go func() {
		_, _ = c.Write(want)
		_, _ = c.Write([]byte("end"))
		_ = c.Close()
	}()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, append(want, "end"...)) {
		t.Fatalf("read %d bytes, want %d", len(got), len(want)+3)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write after Close = %v, want net.ErrClosed", err)
	}
}

// A write deadline that has passed fails new Writes, but bytes accepted before it still
// leave (crypto/tls writes close_notify and then sets an immediate deadline).
func TestCoalescingDeadline(t *testing.T) {
	c, s := tcpPair(t)
	if _, err := c.Write([]byte("alert")); err != nil {
		t.Fatal(err)
	}
	if err := c.SetWriteDeadline(time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("late")); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Write after deadline = %v, want os.ErrDeadlineExceeded", err)
	}
	_ = c.Close()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "alert" {
		t.Fatalf("peer read %q, %v; want %q", got, err, "alert")
	}
}

// A Write blocked on a full buffer (the peer does not read) ends at its deadline.
func TestCoalescingBackpressureHonoursDeadline(t *testing.T) {
	c, _ := tcpPair(t)
	if err := c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	var err error
	for range 10_000 { // far more than the socket buffers and maxPending hold
		if _, err = c.Write(chunk); err != nil {
			break
		}
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Write = %v, want os.ErrDeadlineExceeded", err)
	}
}

// A failed socket write is reported by a later Write.
func TestCoalescingReportsWriteErrors(t *testing.T) {
	c, s := tcpPair(t)
	_ = s.(*net.TCPConn).SetLinger(0)
	_ = s.Close()
	var err error
	for range 1000 {
		if _, err = c.Write(make([]byte, 16<<10)); err != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err == nil {
		t.Fatal("Writes to a reset connection kept succeeding")
	}
}
