package pqkex_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"net/http"
	"sync"
)

// mitm is an active attacker on the network between the pqkex client and the server: it
// buffers each request and response body and lets the test rewrite them.
type mitm struct {
	base http.RoundTripper
	mu   sync.Mutex
	// onRequest may rewrite the request (headers, URL) and its body.
	onRequest func(r *http.Request, body []byte) []byte
	// onResponse may rewrite the response headers and body.
	onResponse func(r *http.Response, body []byte) []byte
	// seen records every request as it went out.
	seen []recorded
}

type recorded struct {
	url    string
	header http.Header
	body   []byte
}

func (m *mitm) RoundTrip(r *http.Request) (*http.Response, error) {
	var body []byte
	if r.Body != nil {
		var err error
		if body, err = io.ReadAll(r.Body); err != nil {
			return nil, err
		}
		_ = r.Body.Close()
	}
	r = r.Clone(r.Context())
	m.mu.Lock()
	hook := m.onRequest
	m.mu.Unlock()
	if hook != nil {
		body = hook(r, body)
	}
	m.mu.Lock()
	m.seen = append(m.seen, recorded{url: r.URL.String(), header: r.Header.Clone(), body: append([]byte(nil), body...)})
	m.mu.Unlock()
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	resp, err := m.base.RoundTrip(r)
	if err != nil || m.onResponse == nil {
		return resp, err
	}
	rb, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		return nil, err
	}
	rb = m.onResponse(resp, rb)
	resp.Body = io.NopCloser(bytes.NewReader(rb))
	return resp, nil
}

func (m *mitm) set(req func(*http.Request, []byte) []byte, resp func(*http.Response, []byte) []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.onRequest, m.onResponse = req, resp
}

func (m *mitm) last() recorded {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.seen[len(m.seen)-1]
}

// frames splits a sealed body into its frames (header and ciphertext each).
func frames(b []byte) [][]byte {
	var out [][]byte
	for len(b) >= 9 {
		n := 9 + int(binary.BigEndian.Uint32(b[5:9]))
		if n > len(b) {
			break
		}
		out = append(out, b[:n:n])
		b = b[n:]
	}
	return out
}

// callFrames splits a sealed request body: the call ID and the hello frame as f[0], then one
// frame each.
func callFrames(b []byte) [][]byte {
	f := frames(b[8:])
	f[0] = append(append([]byte(nil), b[:8]...), f[0]...)
	return f
}

// responseFrames splits a sealed response body: the server nonce and the first frame as
// f[0], then one frame each.
func responseFrames(b []byte) [][]byte {
	f := frames(b[16:])
	f[0] = append(append([]byte(nil), b[:16]...), f[0]...)
	return f
}

func join(fs ...[]byte) []byte { return bytes.Join(fs, nil) }

func flip(b []byte, i int) []byte {
	c := append([]byte(nil), b...)
	c[i] ^= 0x01
	return c
}
