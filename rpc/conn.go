package rpc

import (
	"context"
	"net"
	"os"
	"runtime"
	"sync"
	"time"
)

// Write coalescing.
//
// HTTP/2 in net/http writes and flushes frames one at a time: each becomes its own TLS
// record and its own write syscall, and with many concurrent calls on one connection
// those syscalls are most of the CPU a call costs. Veil wraps each TCP connection below
// TLS (server: the accepted connections; client: the dialed ones) in a coalescingConn.
// A Write appends to a buffer and returns; one flusher goroutine per connection yields
// once, so that writers on other streams can add their frames, then writes everything
// pending in one syscall and repeats while more arrived meanwhile.
//
// The wrapper keeps the net.Conn contract that callers rely on:
//   - bytes leave in the order Writes were called, each Write's bytes contiguous;
//   - a write error is reported by the next Write (the bytes of earlier Writes are lost
//     with the connection anyway);
//   - Writes block while maxPending bytes wait, so a fast writer cannot outrun the
//     socket without limit;
//   - write deadlines bound Writes; the flusher gives accepted bytes at least
//     flushGrace to leave, so the close_notify alert crypto/tls writes just before
//     setting an immediate deadline still goes out;
//   - Close sends what is pending (for up to flushGrace) before closing the socket.

const (
	maxPending = 256 << 10
	maxSpare   = 2 * maxPending
	flushGrace = time.Second
)

type coalescingListener struct{ net.Listener }

func (l coalescingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newCoalescingConn(c), nil
}

// coalescingDial dials with d and wraps the connection.
func coalescingDial(d *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return newCoalescingConn(c), nil
	}
}

type coalescingConn struct {
	net.Conn

	mu       sync.Mutex
	space    sync.Cond // signalled when the buffer drains, the conn fails or closes
	buf      []byte    // bytes accepted and not yet handed to the socket
	spare    []byte    // the flusher's last batch, reused as the next buffer
	flushing bool      // the flusher has been woken or is writing
	err      error     // the first write error
	closed   bool
	deadline time.Time // the write deadline set by the caller
	applied  time.Time // the write deadline last set on the socket

	wake chan struct{}
	done chan struct{}
}

func newCoalescingConn(c net.Conn) *coalescingConn {
	cc := &coalescingConn{Conn: c, wake: make(chan struct{}, 1), done: make(chan struct{})}
	cc.space.L = &cc.mu
	go cc.flush()
	return cc
}

func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if err := c.waitSpace(); err != nil {
		c.mu.Unlock()
		return 0, err
	}
	c.buf = append(c.buf, p...)
	kick := !c.flushing
	c.flushing = true
	c.mu.Unlock()
	if kick {
		c.kick()
	}
	return len(p), nil
}

// waitSpace waits, with c.mu held, until a Write may append; it returns why not.
func (c *coalescingConn) waitSpace() error {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		switch {
		case c.err != nil:
			return c.err
		case c.closed:
			return net.ErrClosed
		case !c.deadline.IsZero() && !time.Now().Before(c.deadline):
			return os.ErrDeadlineExceeded
		case len(c.buf) < maxPending:
			return nil
		}
		if !c.deadline.IsZero() && timer == nil {
			timer = time.AfterFunc(time.Until(c.deadline), func() {
				c.mu.Lock()
				c.space.Broadcast()
				c.mu.Unlock()
			})
		}
		c.space.Wait()
	}
}

func (c *coalescingConn) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// flush is the connection's flusher goroutine.
func (c *coalescingConn) flush() {
	defer close(c.done)
	for range c.wake {
		// Let the writers that are runnable now add their frames to this batch.
		runtime.Gosched()
		c.mu.Lock()
		for len(c.buf) > 0 && c.err == nil {
			out := c.buf
			c.buf, c.spare = c.spare[:0], nil
			c.space.Broadcast()
			deadline := c.deadline
			c.mu.Unlock()
			err := c.writeOut(out, deadline)
			c.mu.Lock()
			if cap(out) <= maxSpare {
				c.spare = out[:0]
			}
			if err != nil {
				c.err, c.buf = err, nil
			}
		}
		c.flushing = false
		c.space.Broadcast()
		stop := c.closed || c.err != nil
		c.mu.Unlock()
		if stop {
			return
		}
	}
}

// writeOut writes one batch, first moving the socket's write deadline if the caller
// changed it: never closer than flushGrace, since these bytes were already accepted.
func (c *coalescingConn) writeOut(b []byte, deadline time.Time) error {
	if !deadline.Equal(c.applied) {
		c.applied = deadline
		d := deadline
		if !d.IsZero() {
			d = later(d, time.Now().Add(flushGrace))
		}
		if err := c.Conn.SetWriteDeadline(d); err != nil {
			return err
		}
	}
	_, err := c.Conn.Write(b)
	return err
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func (c *coalescingConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.space.Broadcast()
	c.mu.Unlock()
	return nil
}

func (c *coalescingConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

// drain marks the conn closed to new Writes and waits up to flushGrace for the flusher
// to send what is pending.
func (c *coalescingConn) drain() {
	c.mu.Lock()
	first := !c.closed
	c.closed = true
	c.space.Broadcast()
	c.mu.Unlock()
	if first {
		c.kick()
	}
	t := time.NewTimer(flushGrace)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
	}
}

// Close sends pending bytes, then closes the socket.
func (c *coalescingConn) Close() error {
	c.drain()
	return c.Conn.Close()
}

// CloseWrite sends pending bytes, then shuts down the socket's writing side where the
// socket supports it.
func (c *coalescingConn) CloseWrite() error {
	c.drain()
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
