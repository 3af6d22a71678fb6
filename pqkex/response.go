package pqkex

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync"
)

// headerOne is the value "1" of pqkex's response markers (spec 6.1); never written.
var headerOne = []string{"1"}

// errFinished is returned by Writes after the response was completed.
var errFinished = errors.New("pqkex: write after the handler returned")

// buffers recycles the frame buffers of sealed bodies (sealWriter, opener).
var buffers = sync.Pool{New: func() any { return new([]byte) }}

const maxPooledBuffer = 2*maxDataFrame + 4*(frameHeaderSize+aeadTagSize)

// getBuffer returns an empty pooled buffer and the pool's box for it, which putBuffer
// takes back: recycling the same box allocates nothing.
func getBuffer() (*[]byte, []byte) {
	box := buffers.Get().(*[]byte)
	if *box == nil {
		*box = make([]byte, 0, 4<<10)
	}
	return box, (*box)[:0]
}

// putBuffer returns b, the buffer last obtained with box (perhaps grown since), to the pool.
func putBuffer(box *[]byte, b []byte) {
	if box == nil || cap(b) > maxPooledBuffer {
		return
	}
	*box = b[:0]
	buffers.Put(box)
}

// sealWriter seals a handler's response: its status and headers into the head frame, its
// body into data frames, its trailers into the FINAL frame (spec 6.2, 6.3). Only routing
// hints go to the ResponseWriter in clear.
type sealWriter struct {
	w        http.ResponseWriter
	h        http.Header
	s        *sealer
	status   int
	sent     bool // head frame and clear headers written to w
	pending  []byte
	out      []byte
	boxes    [2]*[]byte // the pool's boxes of pending and out
	declared []string
	err      error
	held     bool   // the call came with its ticket: say that the server keeps the session (spec 6.6)
	nonce    []byte // the server nonce, written before the first frame (spec 6.2)
}

func (sw *sealWriter) Header() http.Header { return sw.h }

func (sw *sealWriter) WriteHeader(code int) {
	if sw.status == 0 && code >= 200 {
		sw.status = code
	}
}

func (sw *sealWriter) Write(p []byte) (int, error) {
	if sw.err != nil {
		return 0, sw.err
	}
	sw.WriteHeader(http.StatusOK)
	if sw.pending == nil {
		sw.boxes[0], sw.pending = getBuffer()
	}
	sw.pending = append(sw.pending, p...)
	if len(sw.pending) >= maxDataFrame {
		if err := sw.emit(false); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// Flush seals what the handler wrote so far and flushes it to the client.
func (sw *sealWriter) Flush() {
	if sw.err != nil {
		return
	}
	sw.WriteHeader(http.StatusOK)
	if err := sw.emit(false); err != nil {
		return
	}
	if f, ok := sw.w.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the underlying writer (EnableFullDuplex etc.).
func (sw *sealWriter) Unwrap() http.ResponseWriter { return sw.w }

// parseDeclared records the trailer names the handler announced in the Trailer header.
func (sw *sealWriter) parseDeclared() {
	sw.declared = sw.declared[:0]
	for _, v := range sw.h.Values("Trailer") {
		for _, k := range strings.Split(v, ",") {
			if k = strings.TrimSpace(k); k != "" {
				sw.declared = append(sw.declared, http.CanonicalHeaderKey(k))
			}
		}
	}
}

// head returns the response head (spec 6.3): the status and every header the handler set
// but trailers and the framing headers.
func (sw *sealWriter) head() fieldBlock {
	if sw.status == 0 {
		sw.status = http.StatusOK
	}
	return fieldBlock{status: sw.status, headers: sw.h, omit: sw.notInHead}
}

// notInHead reports whether the handler's header k stays out of the response head: a
// framing header, pqkex's own, or a trailer.
func (sw *sealWriter) notInHead(k string) bool {
	return notSealed(k) || strings.HasPrefix(k, http.TrailerPrefix) || sw.isDeclared(k)
}

func addFields(h http.Header, k string, v []string) http.Header {
	if h == nil {
		h = make(http.Header, 4)
	}
	h[k] = v
	return h
}

// sendHeaders writes the clear response headers (spec 6.1): the sealed status and
// Content-Type mirrored for proxies, pqkex's markers, and the sealed body's length when it
// is known (length >= 0).
func (sw *sealWriter) sendHeaders(length int) {
	// headerOne is shared by every response: net/http only reads header values, and its cap
	// of 1 makes an append by any other writer copy it.
	dst := sw.w.Header()
	// Nil when the handler set none: no Content-Type is sniffed from the sealed body.
	dst["Content-Type"] = sw.h["Content-Type"]
	dst[headerSealed] = headerOne
	if sw.held {
		dst[headerSessionHeld] = headerOne
	}
	if length >= 0 {
		dst["Content-Length"] = []string{strconv.Itoa(length)}
	}
	sw.w.WriteHeader(sw.status)
}

func (sw *sealWriter) isDeclared(k string) bool {
	for _, d := range sw.declared {
		if d == http.CanonicalHeaderKey(k) {
			return true
		}
	}
	return false
}

// emit seals the pending bytes (the head frame first, and when final the FINAL frame) and
// writes them.
func (sw *sealWriter) emit(final bool) error {
	var err error
	if sw.out == nil {
		sw.boxes[1], sw.out = getBuffer()
	}
	sw.out = sw.out[:0]
	first := !sw.sent
	if first {
		sw.parseDeclared()
		sw.out = append(sw.out, sw.nonce...) // the body starts with the server nonce
		head := sw.head()
		if sw.out, err = sw.s.appendBlock(sw.out, 0, &head); err != nil {
			sw.err = err
			return err
		}
	}
	sw.out, err = sw.s.appendData(sw.out, sw.pending)
	sw.pending = sw.pending[:0]
	var trailers http.Header
	if err == nil && final {
		trailers = sw.trailers()
		sw.out, err = sw.s.appendBlock(sw.out, flagFinal, &fieldBlock{trailers: trailers})
	}
	if err == nil && first {
		length := -1
		if final && len(trailers) == 0 {
			length = len(sw.out) // the whole sealed body (nonce included) is known: let net/http frame it tightly
		}
		sw.sent = true
		sw.sendHeaders(length)
	}
	if err == nil && len(sw.out) > 0 {
		_, err = sw.w.Write(sw.out)
	}
	if v := trailers.Get("Grpc-Status"); err == nil && v != "" {
		sw.w.Header().Set(http.TrailerPrefix+"Grpc-Status", v) // a clear mirror for gRPC-aware proxies
	}
	if err != nil {
		sw.err = err
	}
	return err
}

// trailers gathers the handler's trailers: declared ones and those set with the Trailer: prefix.
func (sw *sealWriter) trailers() http.Header {
	var trailers http.Header
	for k, v := range sw.h {
		switch {
		case strings.HasPrefix(k, http.TrailerPrefix):
			trailers = addFields(trailers, http.CanonicalHeaderKey(strings.TrimPrefix(k, http.TrailerPrefix)), v)
		case sw.isDeclared(k):
			trailers = addFields(trailers, k, v)
		}
	}
	return trailers
}

// finish ends the response after the handler returned.
func (sw *sealWriter) finish() error {
	defer sw.release()
	if sw.err != nil {
		return sw.err
	}
	return sw.emit(true)
}

// release returns the writer's buffers to the pool once the response is complete (the
// ResponseWriter copied what it was given).
func (sw *sealWriter) release() {
	putBuffer(sw.boxes[0], sw.pending)
	putBuffer(sw.boxes[1], sw.out)
	sw.pending, sw.out, sw.boxes = nil, nil, [2]*[]byte{}
	if sw.err == nil {
		sw.err = errFinished
	}
}
