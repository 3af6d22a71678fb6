package pqkex

import (
	"encoding/binary"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// Field blocks (spec section 6.3): the plaintext of head frames and FINAL frames, in the
// manner of Binary HTTP's known-length messages (RFC 9292): control data, then fields.
//
//	field block = u16 count ‖ entry[count]
//	entry       = u8 kind ‖ u16 len ‖ name ‖ u16 len ‖ value
const (
	kindHeader  = 0 // a header field of a head
	kindTrailer = 1 // a trailer field of a response's FINAL frame
	kindControl = 2 // control data (a pseudo-field) of a head

	ctlMethod  = ":method"
	ctlPath    = ":path"
	ctlAttempt = ":attempt"
	ctlStatus  = ":status"
)

// attemptSize is the size of a request's attempt (spec 6.3, 6.4): 16 random bytes and the
// client's clock in Unix seconds (u64) when the request was first sent. It travels as
// lowercase hex.
const attemptSize = 24

// blockRole says which of the four field blocks of spec 6.3 a block is, and so which
// entries it may hold.
type blockRole uint8

const (
	requestHead blockRole = iota
	responseHead
	requestFinal
	responseFinal
)

// fieldBlock is a decoded field block. Maps are nil when the block has no such fields.
type fieldBlock struct {
	method, path string // request head
	attempt      string // request head: the attempt, lowercase hex (spec 6.4)
	status       int    // response head
	headers      http.Header
	trailers     http.Header
	omit         func(name string) bool // encoding only: headers left out (nil: none)
}

// encode appends the block to b: control data in the order of spec 6.3, then header fields,
// then trailer fields, names in byte order, each name's values in order.
func (f *fieldBlock) encode(b []byte) []byte {
	start := len(b)
	b = append(b, 0, 0)
	n := 0
	control := func(name, value string) {
		b = appendEntry(b, kindControl, name, value)
		n++
	}
	if f.method != "" {
		control(ctlMethod, f.method)
		control(ctlPath, f.path)
		control(ctlAttempt, f.attempt)
	}
	if f.status != 0 {
		var st [8]byte
		b = appendEntry(b, kindControl, ctlStatus, strconv.AppendInt(st[:0], int64(f.status), 10))
		n++
	}
	b = appendFields(b, kindHeader, f.headers, f.omit, &n)
	b = appendFields(b, kindTrailer, f.trailers, nil, &n)
	binary.BigEndian.PutUint16(b[start:], uint16(n))
	return b
}

func appendEntry[V string | []byte](b []byte, kind byte, name string, value V) []byte {
	b = append(b, kind)
	b = binary.BigEndian.AppendUint16(b, uint16(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(value)))
	return append(b, value...)
}

func appendFields(b []byte, kind byte, h http.Header, omit func(string) bool, n *int) []byte {
	if len(h) == 0 {
		return b
	}
	var small [16]string
	keys := small[:0]
	for k := range h {
		if omit == nil || !omit(k) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		// Canonical, as the receiver holds it; a field net/http would not send either (an
		// invalid name or value) is left out rather than failing the whole message.
		name := http.CanonicalHeaderKey(k)
		if !validFieldName(name) {
			continue
		}
		for _, v := range h[k] {
			if validFieldValue(v) {
				b = appendEntry(b, kind, name, v)
				*n++
			}
		}
	}
	return b
}

// emptyFinalBlock is the FINAL frame plaintext of a request: no entries.
var emptyFinalBlock = []byte{0, 0}

// decodeFieldBlock parses a block of the given role and checks it against spec 6.3. The
// block authenticated, so a failure means a faulty peer: malformed.
func decodeFieldBlock(b []byte, role blockRole) (fieldBlock, error) {
	// Names and values are substrings of one copy of the block, and values share one
	// backing array: a block decodes in a few allocations whatever its size.
	p := parser{b: b}
	n := int(p.u16())
	if n > len(b)/5 { // every entry takes at least 5 bytes
		return fieldBlock{}, errMalformed
	}
	var all string
	if n > 0 { // an empty block (a FINAL frame without trailers) needs no copy
		all = string(b)
	}
	vals := make([]string, 0, n)
	var f fieldBlock
	str := func(v []byte) string {
		off := len(b) - len(p.b) - len(v) // v was just taken from b, so it ends where p.b starts
		return all[off : off+len(v)]
	}
	var want []string // the control fields still expected, in order
	switch role {
	case requestHead:
		want = []string{ctlMethod, ctlPath, ctlAttempt}
	case responseHead:
		want = []string{ctlStatus}
	}
	lastKind := byte(kindControl)
	for i := 0; i < n && !p.bad; i++ {
		kind := p.u8()
		name := str(p.vec16())
		value := str(p.vec16())
		if p.bad || !validFieldValue(value) {
			return fieldBlock{}, errMalformed
		}
		switch kind {
		case kindControl:
			if lastKind != kindControl || len(want) == 0 || name != want[0] {
				return fieldBlock{}, errMalformed
			}
			want = want[1:]
			if err := f.setControl(name, value); err != nil {
				return fieldBlock{}, err
			}
		case kindHeader:
			if (role != requestHead && role != responseHead) || len(want) != 0 || !validFieldName(name) {
				return fieldBlock{}, errMalformed
			}
			f.headers, vals = addField(f.headers, vals, name, value)
		case kindTrailer:
			if role != responseFinal || !validFieldName(name) {
				return fieldBlock{}, errMalformed
			}
			f.trailers, vals = addField(f.trailers, vals, name, value)
		default:
			return fieldBlock{}, errMalformed
		}
		lastKind = kind
	}
	if !p.ok() || len(want) != 0 {
		return fieldBlock{}, errMalformed
	}
	return f, nil
}

func (f *fieldBlock) setControl(name, value string) error {
	switch name {
	case ctlMethod:
		if value != http.MethodPost {
			return errMalformed
		}
		f.method = value
	case ctlPath:
		if !strings.HasPrefix(value, "/") {
			return errMalformed
		}
		f.path = value
	case ctlAttempt:
		if !validAttempt(value) {
			return errMalformed
		}
		f.attempt = value
	case ctlStatus:
		code, err := strconv.Atoi(value)
		if err != nil || code < 200 || code > 599 || strconv.Itoa(code) != value {
			return errMalformed
		}
		f.status = code
	}
	return nil
}

// validAttempt reports whether v is an attempt in its one spelling: 2*attemptSize
// lowercase hex digits.
func validAttempt(v string) bool {
	if len(v) != 2*attemptSize {
		return false
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// addField adds a value to h, taking the slice of a name's first value from vals, the
// block's shared backing array.
func addField(h http.Header, vals []string, name, value string) (http.Header, []string) {
	if h == nil {
		h = make(http.Header, 4)
	}
	if vs, ok := h[name]; ok {
		h[name] = append(vs, value) // a repeated name: its own array from here on
		return h, vals
	}
	vals = append(vals, value)
	h[name] = vals[len(vals)-1 : len(vals) : len(vals)]
	return h, vals
}

// validFieldName reports whether name is an RFC 9110 token in Go's canonical form, the
// form in which the receiver's http.Header holds it.
func validFieldName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c >= 0x80 || !isTokenChar[c] {
			return false
		}
	}
	return http.CanonicalHeaderKey(name) == name
}

// validFieldValue reports whether v is a field value net/http would send: no control
// characters other than horizontal tab, in particular no CR, LF or NUL.
func validFieldValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// isTokenChar is RFC 9110's tchar.
var isTokenChar = func() (t [128]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// sealedHeader reports whether a header set by the application (client request or handler
// response) travels in the sealed head (spec 6.3): all but the HTTP framing headers and
// pqkex's own. k is canonical.
func sealedHeader(k string) bool {
	switch k {
	case "Content-Length", "Trailer", "Transfer-Encoding", "Connection", "Host":
		return false
	}
	return !strings.HasPrefix(k, "Veil-Pqkex-") && !slices.Contains(acceptEncodingHeaders, k)
}

// appendBlock appends a head or FINAL frame holding f, encoded in place behind a reserved
// frame header and sealed there. A block must fit one frame.
func (s *sealer) appendBlock(dst []byte, flags byte, f *fieldBlock) ([]byte, error) {
	start := len(dst)
	dst = append(dst, make([]byte, frameHeaderSize)...)
	dst = f.encode(dst)
	n := len(dst) - start - frameHeaderSize
	if n > maxFramePlaintext {
		return dst[:start], errFieldsTooLarge
	}
	return s.sealInPlace(dst, start, flags, n)
}

// notSealed is sealedHeader's complement, for fieldBlock.omit.
func notSealed(k string) bool { return !sealedHeader(http.CanonicalHeaderKey(k)) }

// readHead opens the head frame that starts every body (spec 6.2) and decodes its field
// block. It must be the direction's frame 0: not FINAL, no REKEY before it.
func readHead(o *opener, role blockRole) (fieldBlock, error) {
	flags, pt, err := o.next()
	if err != nil {
		return fieldBlock{}, err
	}
	if flags != 0 || o.dir.seq != 1 {
		return fieldBlock{}, errMalformed
	}
	return decodeFieldBlock(pt, role)
}
