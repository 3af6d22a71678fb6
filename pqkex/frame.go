package pqkex

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"sync"
	"time"
)

// Frames (spec section 6.2): u8 flags ‖ u32 seq ‖ u32 len ‖ AEAD ciphertext.
const (
	callIDSize         = 8  // the u64 call ID that starts every request body (spec 6.2)
	serverNonceSize    = 16 // the server's nonce that starts every response body (spec 6.2)
	flagFinal          = 0x01
	flagRekey          = 0x02
	frameHeaderSize    = 9
	maxDataFrame       = 64 << 10 // the largest data frame a sender makes (spec 6.2)
	maxFramePlaintext  = 64 << 10
	maxFrameCiphertext = maxFramePlaintext + aeadTagSize
)

// callSide is what a call's frames need from the side, client or server, that they belong
// to: the KEM operations of in-stream rekeys (spec 6.2) and accounting. One per-call value
// implements it, so that a call's sealer, opener and readers share one allocation rather
// than a closure each.
type callSide interface {
	encap() (ct, ss []byte, err error) // a rekey's encapsulation to the peer's static key
	decap(ct []byte) ([]byte, error)   // a peer's rekey, with this side's static key
	rekeyed()                          // this side sent a REKEY frame
	counted(n int)                     // n plaintext body bytes sealed or opened
	rejected(err error)                // a received frame failed (once per body)
	final(block []byte) error          // the field block of the FINAL frame of a received body
}

// sealer produces the frames of one direction.
type sealer struct {
	dir        *direction
	side       callSide          // nil: never rekey
	policy     StreamRekeyPolicy // resolved by RekeyPolicy.withDefaults: a zero field is never
	now        func() time.Time
	sinceBytes int64
	since      time.Time
}

func (s *sealer) appendFrame(dst []byte, flags byte, pt []byte) ([]byte, error) {
	start := len(dst)
	dst = append(dst, make([]byte, frameHeaderSize)...)
	seq, err := s.header(dst[start:], flags, len(pt))
	if err != nil {
		return dst[:start], err
	}
	return s.dir.keys.Seal(dst, s.dir.nonce(seq), pt, dst[start:start+frameHeaderSize:start+frameHeaderSize]), nil
}

// sealInPlace seals the n plaintext bytes at buf[start+9:] into a frame whose header it
// writes at buf[start:start+9], without copying them (the AEAD seals in place); the caller
// put them there behind a reserved header.
func (s *sealer) sealInPlace(buf []byte, start int, flags byte, n int) ([]byte, error) {
	body := start + frameHeaderSize
	seq, err := s.header(buf[start:body], flags, n)
	if err != nil {
		return buf[:start], err
	}
	return s.dir.keys.Seal(buf[:body], s.dir.nonce(seq), buf[body:body+n], buf[start:body:body]), nil
}

// header writes the header of the next frame, of n plaintext bytes, into h and returns its
// sequence number.
func (s *sealer) header(h []byte, flags byte, n int) (uint32, error) {
	if s.dir.seq > math.MaxUint32 {
		return 0, errSequenceWrapped
	}
	seq := uint32(s.dir.seq)
	s.dir.seq++
	h[0] = flags
	binary.BigEndian.PutUint32(h[1:5], seq)
	binary.BigEndian.PutUint32(h[5:9], uint32(n+aeadTagSize))
	return seq, nil
}

func (s *sealer) rekeyDue() bool {
	if s.side == nil {
		return false
	}
	if s.policy.Bytes > 0 && s.sinceBytes >= s.policy.Bytes {
		return true
	}
	if s.policy.Age <= 0 {
		return false
	}
	if s.since.IsZero() {
		// The first data: the key's age starts now, so it is not due (one clock reading,
		// not two: a unary body is checked once).
		s.since = s.now()
		return false
	}
	return s.now().Sub(s.since) >= s.policy.Age
}

// appendData seals p in frames of at most 64 KiB, rekeying first when the policy says so.
func (s *sealer) appendData(dst, p []byte) ([]byte, error) {
	var err error
	for len(p) > 0 {
		if s.rekeyDue() {
			ct, ss, err := s.side.encap()
			if err != nil {
				return dst, errInternal
			}
			if dst, err = s.appendFrame(dst, flagRekey, ct); err != nil {
				return dst, err
			}
			if err := s.dir.advance(ss, ct); err != nil {
				return dst, err
			}
			s.sinceBytes, s.since = 0, s.now()
			s.side.rekeyed()
		}
		n := min(len(p), maxDataFrame)
		if dst, err = s.appendFrame(dst, 0, p[:n]); err != nil {
			return dst, err
		}
		s.sinceBytes += int64(n)
		p = p[n:]
	}
	return dst, nil
}

// opener reads and authenticates the frames of one direction.
type opener struct {
	dir  *direction
	r    io.Reader
	side callSide // nil: rekey frames are refused
	hdr  [frameHeaderSize]byte
	buf  []byte
	box  *[]byte // buf's pool box (getBuffer), if it came from the pool

	// With a body read whole (preread), frames are opened in place in mem, the rest of it.
	whole bool
	mem   []byte
}

// maxPreread bounds the bodies of known length read whole before their frames are opened;
// longer ones are read frame by frame.
const maxPreread = 256 << 10

// preread reads the rest of a body of known length n in one piece, so that its frames are
// opened in place rather than read header by header through the HTTP/2 body pipe. A body
// shorter than n is truncated.
func (o *opener) preread(n int64) error {
	if n < 0 || n > maxPreread {
		return nil
	}
	b := o.buf // an earlier frame's buffer, if any: nothing refers to it any more
	if b == nil {
		o.box, b = getBuffer()
	}
	if int64(cap(b)) < n {
		b = make([]byte, n)
	}
	b = b[:n]
	if _, err := io.ReadFull(o.r, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return errTruncated
		}
		return err
	}
	o.whole, o.mem, o.buf = true, b, b
	return nil
}

// readCallID reads the call ID that starts a request body (spec 6.2).
func (o *opener) readCallID() (uint64, error) {
	// Read into the frame header's buffer (longer than the call ID, and not yet in use), which
	// lives in the call's allocation: a local array would escape through io.ReadFull.
	b, err := o.readFixed(o.hdr[:callIDSize])
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(b), nil
}

// readNonce reads the server nonce that starts a response body (spec 6.2) into dst.
func (o *opener) readNonce(dst *[serverNonceSize]byte) error {
	b, err := o.readFixed(dst[:])
	copy(dst[:], b)
	return err
}

// readFixed returns the next len(buf) bytes of the body (the call ID, the server nonce or
// a frame header): from a body read whole, or read into buf. A body that ends first is
// truncated.
func (o *opener) readFixed(buf []byte) ([]byte, error) {
	if o.whole {
		b, ok := o.take(len(buf))
		if !ok {
			return nil, errTruncated
		}
		return b, nil
	}
	if _, err := io.ReadFull(o.r, buf); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, errTruncated
		}
		return nil, err
	}
	return buf, nil
}

// openResponse starts reading a response body: the whole body first when its length n is
// known and small (n < 0: unknown), then the server nonce, from which it derives the s2c
// keys that o opens the frames with.
func openResponse(o *opener, keys *callKeys, n int64) error {
	if err := o.preread(n); err != nil {
		return err
	}
	if err := o.readNonce(&keys.nonce); err != nil {
		return err
	}
	if err := keys.deriveS2C(); err != nil {
		return err
	}
	o.dir = &keys.s2c
	return nil
}

// take returns the next n bytes of a body read whole.
func (o *opener) take(n int) ([]byte, bool) {
	if len(o.mem) < n {
		return nil, false
	}
	b := o.mem[:n:n]
	o.mem = o.mem[n:]
	return b, true
}

// next returns the next data or FINAL frame; REKEY frames are processed on the way.
func (o *opener) next() (byte, []byte, error) {
	for {
		hdr, err := o.readFixed(o.hdr[:])
		if err != nil {
			return 0, nil, err
		}
		flags := hdr[0]
		seq := binary.BigEndian.Uint32(hdr[1:5])
		size := binary.BigEndian.Uint32(hdr[5:9])
		// The length is not authenticated either: one out of range is tampering, never
		// malformed (spec 6.2), or a proxy could fail any call as invalid_argument.
		if size < aeadTagSize || size > maxFrameCiphertext {
			return 0, nil, errFrameLength
		}
		// The sequence number is the nonce: a frame that is not the next one (replayed,
		// reordered, a frame dropped before it, a flipped seq) is tampering, like any frame
		// that fails to open; it is not classified further before authentication (spec 6.2).
		if uint64(seq) != o.dir.seq {
			return 0, nil, errTampered
		}
		var ct []byte
		if o.whole {
			var ok bool
			if ct, ok = o.take(int(size)); !ok {
				return 0, nil, errTruncated
			}
		} else {
			if o.buf == nil {
				o.box, o.buf = getBuffer()
			}
			if cap(o.buf) < int(size) {
				o.buf = make([]byte, size)
			}
			ct = o.buf[:size]
			if _, err := io.ReadFull(o.r, ct); err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					return 0, nil, errTruncated
				}
				return 0, nil, err
			}
		}
		pt, err := o.dir.keys.Open(ct[:0], o.dir.nonce(seq), ct, hdr)
		if err != nil {
			return 0, nil, errTampered
		}
		o.dir.seq++
		switch flags {
		case 0, flagFinal:
			return flags, pt, nil
		case flagRekey:
			if o.side == nil {
				return 0, nil, errMalformed
			}
			ss, err := o.side.decap(pt)
			if err != nil {
				return 0, nil, errMalformed
			}
			if err := o.dir.advance(ss, pt); err != nil {
				return 0, nil, err
			}
		default:
			return 0, nil, errMalformed
		}
	}
}

// openReader is the plaintext body of a sealed stream.
type openReader struct {
	o       *opener
	body    io.Closer
	pending []byte
	err     error
	side    callSide        // told of bytes, the first failure and the FINAL frame's block; may be nil
	ctx     context.Context // the client's call: a transport failure before FINAL is truncation; nil on the server
}

func (r *openReader) Read(p []byte) (int, error) {
	for len(r.pending) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		r.err = r.fill()
		if r.err != nil && r.err != io.EOF && r.side != nil && isRejection(r.err) {
			r.side.rejected(r.err)
		}
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

// fill reads one frame. It returns io.EOF after a FINAL frame followed by the end of the body.
func (r *openReader) fill() error {
	flags, pt, err := r.o.next()
	if isRejection(err) {
		return toConnect(err)
	}
	if err != nil {
		if r.ctx != nil {
			if err = cutShort(r.ctx, err); isRejection(err) {
				return toConnect(err)
			}
		}
		return err // the caller's cancellation, or on the server the transport's failure: connect-go codes it
	}
	if r.side != nil {
		r.side.counted(len(pt))
	}
	if flags == flagFinal {
		// Anything after FINAL is never read: waiting for the end of the body here would
		// deadlock a full-duplex stream behind a proxy that ends the response only after the
		// request.
		if r.side != nil {
			if err := r.side.final(pt); err != nil {
				return toConnect(err)
			}
		}
		putBuffer(r.o.box, r.o.buf) // nothing refers to it any more: pending is empty
		r.o.buf, r.o.mem, r.o.box = nil, nil, nil
		return io.EOF
	}
	// pt lies in the opener's buffer, which the next frame overwrites; Read calls fill
	// again only once pending is consumed.
	r.pending = pt
	return nil
}

func (r *openReader) Close() error {
	if r.body == nil {
		return nil
	}
	return r.body.Close()
}

// dataBuffers recycles the plaintext read buffers of request bodies.
var dataBuffers = sync.Pool{New: func() any { return new([maxDataFrame]byte) }}

// sealReader turns a plaintext request body into the call ID and frames: the call ID and
// the head frame at once, one data frame per read of the source, then the FINAL frame.
type sealReader struct {
	s       *sealer
	callID  uint64
	head    []byte // the request head's field block (spec 6.3), plaintext
	src     io.ReadCloser
	out     []byte
	buf     *[maxDataFrame]byte
	started bool
	done    bool
	err     error
	side    callSide // may be nil
}

func (r *sealReader) Read(p []byte) (int, error) {
	for len(r.out) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		r.err = r.fill()
	}
	n := copy(p, r.out)
	r.out = r.out[n:]
	return n, nil
}

func (r *sealReader) fill() error {
	if !r.started {
		r.started = true
		var err error
		r.out = binary.BigEndian.AppendUint64(r.out[:0], r.callID)
		r.out, err = r.s.appendFrame(r.out, 0, r.head)
		return err
	}
	if r.done {
		return io.EOF
	}
	if r.src == nil {
		r.done = true
		var err error
		r.out, err = r.s.appendFrame(r.out[:0], flagFinal, emptyFinalBlock)
		return err
	}
	if r.buf == nil {
		r.buf = dataBuffers.Get().(*[maxDataFrame]byte)
	}
	n, err := r.src.Read(r.buf[:])
	if n > 0 {
		if r.side != nil {
			r.side.counted(n)
		}
		var serr error
		if r.out, serr = r.s.appendData(r.out[:0], r.buf[:n]); serr != nil {
			return serr
		}
	}
	if errors.Is(err, io.EOF) {
		r.done = true
		dataBuffers.Put(r.buf)
		r.buf = nil
		var serr error
		r.out, serr = r.s.appendFrame(r.out, flagFinal, emptyFinalBlock)
		return serr
	}
	return err
}

func (r *sealReader) Close() error {
	if r.src == nil {
		return nil
	}
	return r.src.Close()
}
