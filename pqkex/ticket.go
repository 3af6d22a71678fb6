package pqkex

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// TicketKey is one ticket-sealing key. Secret must stay secret and be shared by every replica
// that should accept the key's tickets.
type TicketKey struct {
	ID     uint32
	Secret [32]byte
}

// GenerateTicketKey returns a random key with the given ID. rand may be nil for crypto/rand.
func GenerateTicketKey(id uint32, rand io.Reader) (TicketKey, error) {
	k := TicketKey{ID: id}
	if err := readRandom(rand, k.Secret[:]); err != nil {
		return TicketKey{}, err
	}
	return k, nil
}

// TicketKeys seals session tickets with the current key and opens tickets sealed with the
// current or the previous key, so replicas sharing the same keys can continue each other's
// sessions with no shared state. Rotate at intervals no shorter than the ticket lifetime:
// a ticket stays valid until it expires or its key leaves the set (two rotations later).
// A *TicketKeys is safe for concurrent use.
type TicketKeys struct {
	mu       sync.RWMutex
	current  ticketCipher
	previous *ticketCipher
	gen      atomic.Uint64 // counts rotations: servers' cached tickets are checked again after one
}

type ticketCipher struct {
	id     uint32
	serial uint64 // unique in the process: a later key with a reused ID is another key
	aead   cipher.AEAD
}

var ticketCipherSerial atomic.Uint64

func newTicketCipher(k TicketKey) ticketCipher {
	b, err := aes.NewCipher(k.Secret[:])
	if err != nil {
		panic("pqkex: " + err.Error()) // unreachable: the key is 32 bytes
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic("pqkex: " + err.Error())
	}
	return ticketCipher{id: k.ID, serial: ticketCipherSerial.Add(1), aead: g}
}

// NewTicketKeys returns a key set whose current key is current and, if given, whose previous
// key is previous[0].
func NewTicketKeys(current TicketKey, previous ...TicketKey) (*TicketKeys, error) {
	if len(previous) > 1 {
		return nil, errors.New("pqkex: at most one previous ticket key")
	}
	t := &TicketKeys{current: newTicketCipher(current)}
	if len(previous) == 1 {
		if previous[0].ID == current.ID {
			return nil, errors.New("pqkex: ticket key IDs must differ")
		}
		p := newTicketCipher(previous[0])
		t.previous = &p
	}
	return t, nil
}

// Rotate makes next the current key; the current key becomes the previous one and the old
// previous key is dropped, so its tickets are refused from now on.
func (t *TicketKeys) Rotate(next TicketKey) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if next.ID == t.current.id {
		return errors.New("pqkex: ticket key IDs must differ")
	}
	cur := t.current
	t.previous = &cur
	t.current = newTicketCipher(next)
	t.gen.Add(1)
	return nil
}

// CurrentID returns the ID of the key that seals new tickets.
func (t *TicketKeys) CurrentID() uint32 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.current.id
}

const ticketAADLabel = labelPrefix + "ticket"

func ticketAAD(id uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte(ticketAADLabel), id)
}

func (t *TicketKeys) seal(rand io.Reader, plaintext []byte) ([]byte, error) {
	t.mu.RLock()
	c := t.current
	t.mu.RUnlock()
	out := binary.BigEndian.AppendUint32(nil, c.id)
	nonce := make([]byte, aeadNonceSize)
	if err := readRandom(rand, nonce); err != nil {
		return nil, err
	}
	out = append(out, nonce...)
	return c.aead.Seal(out, nonce, plaintext, ticketAAD(c.id)), nil
}

// openSerial opens a ticket and returns the serial of the key that opened it.
func (t *TicketKeys) openSerial(ticket []byte) ([]byte, uint64, error) {
	if len(ticket) < 4+aeadNonceSize+aeadTagSize {
		return nil, 0, errMalformed
	}
	id := binary.BigEndian.Uint32(ticket)
	t.mu.RLock()
	var c *ticketCipher
	if t.current.id == id {
		c = &t.current
	} else if t.previous != nil && t.previous.id == id {
		c = t.previous
	}
	t.mu.RUnlock()
	if c == nil {
		return nil, 0, errUnknownTicket
	}
	pt, err := c.aead.Open(nil, ticket[4:4+aeadNonceSize], ticket[4+aeadNonceSize:], ticketAAD(id))
	if err != nil {
		return nil, 0, errUnknownTicket
	}
	return pt, c.serial, nil
}

// ticketState is the plaintext of a ticket (spec section 7).
type ticketState struct {
	suite        Scheme
	aead         AEAD
	flags        uint8
	sessionID    []byte
	secret       []byte
	issued       uint64
	expiry       uint64
	serverDigest [credDigestSize]byte
	clientID     string
	clientPK     []byte

	secretKey *hmacKey // secret keyed for the per-call derivations (set when cached)
}

func (s *ticketState) marshal() []byte {
	b := []byte{wireVersion}
	b = binary.BigEndian.AppendUint16(b, s.suite.ID())
	b = binary.BigEndian.AppendUint16(b, s.aead.id())
	b = append(b, s.flags)
	b = append(b, s.sessionID...)
	b = appendVec8(b, s.secret)
	b = binary.BigEndian.AppendUint64(b, s.issued)
	b = binary.BigEndian.AppendUint64(b, s.expiry)
	b = append(b, s.serverDigest[:]...)
	b = appendVec16(b, []byte(s.clientID))
	return appendVec16(b, s.clientPK)
}

func parseTicketState(b []byte) (*ticketState, error) {
	p := parser{b: b}
	version := p.u8()
	if !p.bad && version != wireVersion {
		return nil, errUnknownTicket // a session of another wire version: the client makes a new one (spec 5.5)
	}
	s := &ticketState{suite: SchemeByID(p.u16()), aead: AEAD(p.u16()), flags: p.u8()}
	// AEAD 0 would be read as AES-256-GCM but re-encode as 0x0001 (malleable): refused, as in
	// ClientHello.
	if p.bad || version != wireVersion || s.suite == nil || s.aead == 0 || !s.aead.supported() || !validFlags(s.flags) {
		return nil, errMalformed
	}
	s.sessionID = p.take(sessionIDSize)
	s.secret = p.vec8()
	s.issued, s.expiry = p.u64(), p.u64()
	copy(s.serverDigest[:], p.take(credDigestSize))
	s.clientID = string(p.vec16())
	s.clientPK = p.exact16(s.suite.PublicKeySize())
	if !p.ok() || len(s.secret) != s.suite.Hash().Size() || !validSPIFFEID(s.clientID) {
		return nil, errMalformed
	}
	return s, nil
}

// openTicket decrypts and checks a ticket at time now.
func (t *TicketKeys) openTicket(ticket []byte, now time.Time) (*ticketState, error) {
	s, _, err := t.openTicketSerial(ticket, now)
	return s, err
}

// openTicketSerial is openTicket, also returning the serial of the key that opened it.
func (t *TicketKeys) openTicketSerial(ticket []byte, now time.Time) (*ticketState, uint64, error) {
	pt, serial, err := t.openSerial(ticket)
	if err != nil {
		return nil, 0, err
	}
	s, err := parseTicketState(pt)
	if err != nil {
		return nil, 0, err
	}
	if unixSeconds(now) >= s.expiry {
		return nil, 0, errTicketExpired
	}
	return s, serial, nil
}

// maxCachedTickets bounds a server's cache of opened tickets (one entry per live session,
// about 3 KB each, in each of its two indexes).
const maxCachedTickets = 4096

// ticketCache keeps the sessions whose tickets a server opened, until they expire: by the
// ticket's header value as sent, so that later calls with the ticket cost a lookup instead
// of base64 decoding, AES-GCM and parsing, and by session ID for the short form (spec 6.6).
// An entry exists only for a ticket that opened, each use checks the session's expiry
// again, and after a rotation of the ticket keys an entry is used only while its ticket's
// key is still in the set (otherwise the ticket is opened again, and refused, or the short
// form refused as unknown_session), so a ticket whose key left the set is refused as before.
type ticketCache struct {
	mu       sync.Mutex
	byHeader map[string]cachedTicket
	bySID    map[[sessionIDSize]byte]cachedTicket
}

type cachedTicket struct {
	st     *ticketState
	gen    uint64 // the key set's rotation count when the entry was made
	serial uint64 // the key that sealed the ticket (ticketCipher.serial)
}

// valid reports whether e may be used with keys at rotation count gen: unchanged since
// it was checked, or its ticket's key is still in the set.
func (e cachedTicket) valid(keys *TicketKeys, gen uint64) bool {
	return e.gen == gen || keys.has(e.serial)
}

func (c *ticketCache) get(keys *TicketKeys, header string, gen uint64) *ticketState {
	c.mu.Lock()
	e, ok := c.byHeader[header]
	c.mu.Unlock()
	if !ok || !e.valid(keys, gen) {
		return nil
	}
	return e.st
}

func (c *ticketCache) getSession(keys *TicketKeys, sid [sessionIDSize]byte, gen uint64) *ticketState {
	c.mu.Lock()
	e, ok := c.bySID[sid]
	c.mu.Unlock()
	if !ok || !e.valid(keys, gen) {
		return nil
	}
	return e.st
}

// bound makes room in m for one more entry: it drops expired and stale entries and, if
// that is not enough, arbitrary ones (map order) down to three quarters of the bound.
func bound[K comparable](m map[K]cachedTicket, keys *TicketKeys, gen, now uint64) {
	if len(m) < maxCachedTickets {
		return
	}
	for k, e := range m {
		if e.st.expiry <= now || !e.valid(keys, gen) || len(m) >= maxCachedTickets*3/4 {
			delete(m, k)
		}
	}
}

func (c *ticketCache) put(keys *TicketKeys, header string, st *ticketState, serial, gen, now uint64) {
	var sid [sessionIDSize]byte
	copy(sid[:], st.sessionID)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.byHeader == nil {
		c.byHeader = make(map[string]cachedTicket)
		c.bySID = make(map[[sessionIDSize]byte]cachedTicket)
	}
	bound(c.byHeader, keys, gen, now)
	bound(c.bySID, keys, gen, now)
	e := cachedTicket{st: st, gen: gen, serial: serial}
	c.byHeader[header] = e
	c.bySID[sid] = e
}

// has reports whether the set still holds the key with this serial (current or previous).
func (t *TicketKeys) has(serial uint64) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.current.serial == serial || (t.previous != nil && t.previous.serial == serial)
}

// openTicketHeader opens the base64url ticket of a request header at time now, through
// cache, and keeps its session there for the short form.
func (t *TicketKeys) openTicketHeader(cache *ticketCache, header string, now time.Time) (*ticketState, error) {
	gen := t.gen.Load()
	if st := cache.get(t, header, gen); st != nil {
		if unixSeconds(now) >= st.expiry {
			return nil, errTicketExpired
		}
		return st, nil
	}
	ticket, err := base64.RawURLEncoding.DecodeString(header)
	if err != nil {
		return nil, errMalformed
	}
	st, serial, err := t.openTicketSerial(ticket, now)
	if err != nil {
		return nil, err
	}
	st.secretKey = sessionKey(st.suite.Hash(), st.secret)
	cache.put(t, header, st, serial, gen, unixSeconds(now))
	return st, nil
}

// openSessionHeader finds the session a short-form request names (spec 6.6).
func (t *TicketKeys) openSessionHeader(cache *ticketCache, header string, now time.Time) (*ticketState, error) {
	var sid [sessionIDSize]byte
	if base64.RawURLEncoding.EncodedLen(sessionIDSize) != len(header) {
		return nil, errMalformed
	}
	if n, err := base64.RawURLEncoding.Decode(sid[:], []byte(header)); err != nil || n != sessionIDSize {
		return nil, errMalformed
	}
	st := cache.getSession(t, sid, t.gen.Load())
	if st == nil {
		return nil, errUnknownSession
	}
	if unixSeconds(now) >= st.expiry {
		return nil, errTicketExpired
	}
	return st, nil
}
