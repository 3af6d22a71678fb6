package pqkex

import "encoding/binary"

// parser reads the big-endian, length-prefixed encodings of the spec. After the first
// failure every read returns zero values; ok reports whether everything parsed and nothing
// is left over.
type parser struct {
	b   []byte
	bad bool
}

func (p *parser) take(n int) []byte {
	if p.bad || n < 0 || len(p.b) < n {
		p.bad = true
		return nil
	}
	out := p.b[:n:n]
	p.b = p.b[n:]
	return out
}

func (p *parser) u8() uint8 {
	b := p.take(1)
	if b == nil {
		return 0
	}
	return b[0]
}

func (p *parser) u16() uint16 {
	b := p.take(2)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint16(b)
}

func (p *parser) u64() uint64 {
	b := p.take(8)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

// vec8 and vec16 read a length-prefixed byte string.
func (p *parser) vec8() []byte  { return p.take(int(p.u8())) }
func (p *parser) vec16() []byte { return p.take(int(p.u16())) }

// exact reads a u16-prefixed byte string whose length must be n.
func (p *parser) exact16(n int) []byte {
	if int(p.u16()) != n {
		p.bad = true
		return nil
	}
	return p.take(n)
}

// ok reports whether every read succeeded and the input is used up.
func (p *parser) ok() bool { return !p.bad && len(p.b) == 0 }

func appendVec16(b, v []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}

func appendVec8(b, v []byte) []byte {
	b = append(b, byte(len(v)))
	return append(b, v...)
}
