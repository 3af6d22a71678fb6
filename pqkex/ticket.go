package pqkex

import (
	"crypto"
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

// TicketKey is one ticket-sealing secret. Secret must stay secret and be shared only by the
// replicas of one service (spec 7.1). Created is when the key was made; zero means "when the
// key set received it".
type TicketKey struct {
	ID      uint32
	Secret  [32]byte
	Created time.Time
}

// GenerateTicketKey returns a random key with the given ID. rand may be nil for crypto/rand.
func GenerateTicketKey(id uint32, rand io.Reader) (TicketKey, error) {
	k := TicketKey{ID: id}
	if err := readRandom(rand, k.Secret[:]); err != nil {
		return TicketKey{}, err
	}
	return k, nil
}

// DefaultTicketKeyPeriod is the period of a key set made by [NewTicketKeys]: the default
// ticket lifetime.
const DefaultTicketKeyPeriod = time.Hour

// TicketKeys seals session tickets with the current key and opens tickets sealed with the
// current or the previous key, so replicas of one service sharing the same keys can continue
// each other's sessions with no shared state (spec 7). The current key seals for at most
// the period; after a rotation the previous key opens tickets for one more period and is
// then erased, and its tickets are refused. Servers cap every ticket's lifetime at the
// period, so no ticket outlives its key. A *TicketKeys is safe for concurrent use.
type TicketKeys struct {
	mu       sync.RWMutex
	current  *ticketSecret
	previous *ticketSecret
	period   time.Duration
	now      func() time.Time
	auto     bool          // draws its own keys (a set private to one process)
	next     atomic.Int64  // Unix nanoseconds of the next erasure or automatic rotation
	gen      atomic.Uint64 // counts changes: servers' cached tickets are checked again after one
}

type ticketSecret struct {
	id      uint32
	serial  uint64 // unique in the process: a later key with a reused ID is another key
	secret  [32]byte
	created time.Time
	retired time.Time // when it stopped sealing (previous keys only)
}

var ticketCipherSerial atomic.Uint64

func newTicketSecret(k TicketKey, now time.Time) *ticketSecret {
	created := k.Created
	if created.IsZero() || created.After(now) {
		created = now
	}
	return &ticketSecret{id: k.ID, serial: ticketCipherSerial.Add(1), secret: k.Secret, created: created}
}

// NewTicketKeys returns a key set of period [DefaultTicketKeyPeriod] on the system clock whose
// current key is current and, if given, whose previous key is previous[0].
func NewTicketKeys(current TicketKey, previous ...TicketKey) (*TicketKeys, error) {
	return NewTicketKeySet(DefaultTicketKeyPeriod, nil, current, previous...)
}

// NewTicketKeySet is NewTicketKeys with a period and a clock (nil: time.Now). The previous
// key, if any, stopped sealing when current was created and is erased one period later.
func NewTicketKeySet(period time.Duration, now func() time.Time, current TicketKey, previous ...TicketKey) (*TicketKeys, error) {
	if len(previous) > 1 {
		return nil, errors.New("pqkex: at most one previous ticket key")
	}
	if period <= 0 {
		return nil, errors.New("pqkex: ticket key period must be positive")
	}
	if now == nil {
		now = time.Now
	}
	t := &TicketKeys{period: period, now: now}
	at := now()
	t.current = newTicketSecret(current, at)
	if len(previous) == 1 {
		if previous[0].ID == current.ID {
			return nil, errors.New("pqkex: ticket key IDs must differ")
		}
		t.previous = newTicketSecret(previous[0], at)
		t.previous.retired = t.current.created
	}
	t.schedule()
	return t, nil
}

// NewRotatingTicketKeys returns a key set private to this process that rotates itself: a
// new random key every period, on the clock now (nil: time.Now). It is what a server uses
// without [WithTicketKeys]; replicas that share sessions need a shared set (a file or NATS).
func NewRotatingTicketKeys(period time.Duration, now func() time.Time) (*TicketKeys, error) {
	k, err := GenerateTicketKey(1, nil)
	if err != nil {
		return nil, err
	}
	t, err := NewTicketKeySet(period, now, k)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	t.auto = true
	t.schedule()
	t.mu.Unlock()
	return t, nil
}

// Period returns how long a key seals tickets, and how long it opens them after that.
func (t *TicketKeys) Period() time.Duration { return t.period }

// schedule records when maintain has work next; the caller holds mu (or owns t).
func (t *TicketKeys) schedule() {
	next := time.Unix(1<<62, 0)
	if t.previous != nil {
		next = t.previous.retired.Add(t.period)
	}
	if t.auto {
		if r := t.current.created.Add(t.period); r.Before(next) {
			next = r
		}
	}
	t.next.Store(next.UnixNano())
}

// maintain erases the previous key once its period is over and, in a self-rotating set,
// rotates a current key that is a period old. Cheap when there is nothing to do.
func (t *TicketKeys) maintain(now time.Time) {
	if now.UnixNano() < t.next.Load() {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.maintainLocked(now)
}

func (t *TicketKeys) maintainLocked(now time.Time) {
	if t.auto && !now.Before(t.current.created.Add(t.period)) {
		if k, err := GenerateTicketKey(t.current.id+1, nil); err == nil {
			k.Created = now
			t.rotateLocked(k, now)
		}
	}
	if t.previous != nil && !now.Before(t.previous.retired.Add(t.period)) {
		t.erase(t.previous)
		t.previous = nil
		t.gen.Add(1)
	}
	t.schedule()
}

// erase overwrites a key's secret; nothing else holds it (per-ticket keys are derived and
// dropped, spec 7).
func (t *TicketKeys) erase(k *ticketSecret) {
	clear(k.secret[:])
}

// Rotate makes next the current key; the current key becomes the previous one, which opens
// tickets for one more period, and the old previous key is erased, so its tickets are
// refused from now on.
func (t *TicketKeys) Rotate(next TicketKey) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if next.ID == t.current.id {
		return errors.New("pqkex: ticket key IDs must differ")
	}
	t.rotateLocked(next, t.now())
	t.maintainLocked(t.now())
	return nil
}

func (t *TicketKeys) rotateLocked(next TicketKey, now time.Time) {
	if t.previous != nil {
		t.erase(t.previous)
	}
	t.previous = t.current
	t.previous.retired = now
	t.current = newTicketSecret(next, now)
	t.gen.Add(1)
	t.schedule()
}

// CurrentID returns the ID of the key that seals new tickets.
func (t *TicketKeys) CurrentID() uint32 {
	t.maintain(t.now())
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.current.id
}

const (
	ticketAADLabel  = labelPrefix + "ticket"
	ticketSaltSize  = 16
	ticketKeyLabel  = "ticket key"
	ticketOverhead  = 4 + ticketSaltSize + aeadTagSize
	ticketHashLabel = "binding id"
)

// ticketAAD is "veil-pqkex-v1 ticket" ‖ u32 key_id ‖ salt ‖ u16 len ‖ server_spiffe_id.
func ticketAAD(id uint32, salt []byte, serverID string) []byte {
	b := make([]byte, 0, len(ticketAADLabel)+4+ticketSaltSize+2+len(serverID))
	b = append(b, ticketAADLabel...)
	b = binary.BigEndian.AppendUint32(b, id)
	b = append(b, salt...)
	return appendVec16(b, []byte(serverID))
}

// ticketAEAD returns the AES-256-GCM of one ticket: K_t = ExpandLabel-SHA256(secret,
// "ticket key", u16 len ‖ server_spiffe_id ‖ salt, 32) (spec 7). It seals one ticket only,
// so its nonce is zero.
func ticketAEAD(secret *[32]byte, serverID string, salt []byte) cipher.AEAD {
	ctx := appendVec16(make([]byte, 0, 2+len(serverID)+ticketSaltSize), []byte(serverID))
	ctx = append(ctx, salt...)
	key := expandLabel(crypto.SHA256, secret[:], ticketKeyLabel, ctx, 32)
	b, err := aes.NewCipher(key)
	clear(key)
	if err != nil {
		panic("pqkex: " + err.Error()) // unreachable: the key is 32 bytes
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic("pqkex: " + err.Error())
	}
	return g
}

var zeroNonce [aeadNonceSize]byte

// seal seals a ticket's plaintext to serverID under the current key at time now.
func (t *TicketKeys) seal(rand io.Reader, serverID string, plaintext []byte, now time.Time) ([]byte, error) {
	t.maintain(now)
	out := make([]byte, 4+ticketSaltSize, 4+ticketSaltSize+len(plaintext)+aeadTagSize)
	salt := out[4:]
	if err := readRandom(rand, salt); err != nil {
		return nil, err
	}
	t.mu.RLock()
	id := t.current.id
	g := ticketAEAD(&t.current.secret, serverID, salt)
	t.mu.RUnlock()
	binary.BigEndian.PutUint32(out, id)
	return g.Seal(out, zeroNonce[:], plaintext, ticketAAD(id, salt, serverID)), nil
}

// openSerial opens a ticket sealed to serverID and returns the serial of the key that opened
// it.
func (t *TicketKeys) openSerial(ticket []byte, serverID string, now time.Time) ([]byte, uint64, error) {
	if len(ticket) < ticketOverhead {
		return nil, 0, errMalformed
	}
	t.maintain(now)
	id, salt := binary.BigEndian.Uint32(ticket), ticket[4:4+ticketSaltSize]
	t.mu.RLock()
	var k *ticketSecret
	if t.current.id == id {
		k = t.current
	} else if t.previous != nil && t.previous.id == id {
		k = t.previous
	}
	var g cipher.AEAD
	var serial uint64
	if k != nil {
		g, serial = ticketAEAD(&k.secret, serverID, salt), k.serial
	}
	t.mu.RUnlock()
	if g == nil {
		return nil, 0, errUnknownTicket
	}
	pt, err := g.Open(nil, zeroNonce[:], ticket[4+ticketSaltSize:], ticketAAD(id, salt, serverID))
	if err != nil {
		return nil, 0, errUnknownTicket
	}
	return pt, serial, nil
}

// ticketState is the plaintext of a ticket (spec section 7).
type ticketState struct {
	suite      Scheme
	aead       AEAD
	flags      uint8
	sessionID  []byte
	secret     []byte
	issued     uint64
	expiry     uint64
	serverHash []byte // H(server credential), Nh bytes (spec 7)
	bindingID  []byte // with flagBinding: ExpandLabel(cb, "binding id") (spec 7.3)
	clientID   string
	clientPK   []byte

	secretKey *hmacKey                  // call_root keyed for the per-call derivations (set when cached)
	onConn    atomic.Pointer[connCheck] // the last connection a call came over (spec 7.3)
}

// ticketStateSize is the size of a ticket's plaintext for a client ID and public key of
// these lengths, with hashes and secrets of at most maxHashSize bytes: at least
// len(s.marshal()).
func ticketStateSize(clientID, clientPK int) int {
	return 6 + sessionIDSize + 1 + maxHashSize + 16 + maxHashSize + bindingIDSize + 2 + clientID + 2 + clientPK
}

// ticketSizeHint is at least the size of a ticket sealed for a session with peer.
func ticketSizeHint(peer *Credential) int {
	return ticketOverhead + ticketStateSize(len(peer.spiffeID), len(peer.publicKey))
}

func (s *ticketState) marshal() []byte {
	b := make([]byte, 0, ticketStateSize(len(s.clientID), len(s.clientPK)))
	b = append(b, wireVersion)
	b = binary.BigEndian.AppendUint16(b, s.suite.ID())
	b = binary.BigEndian.AppendUint16(b, s.aead.id())
	b = append(b, s.flags)
	b = append(b, s.sessionID...)
	b = appendVec8(b, s.secret)
	b = binary.BigEndian.AppendUint64(b, s.issued)
	b = binary.BigEndian.AppendUint64(b, s.expiry)
	b = append(b, s.serverHash...)
	if s.flags&flagBinding != 0 {
		b = append(b, s.bindingID...)
	}
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
	if p.bad || version != wireVersion || s.suite == nil || s.aead == 0 || !s.aead.supported() || !validFlagsFor(s.suite, s.flags) {
		return nil, errMalformed
	}
	s.sessionID = p.take(sessionIDSize)
	s.secret = p.vec8()
	s.issued, s.expiry = p.u64(), p.u64()
	s.serverHash = p.take(s.suite.Hash().Size())
	if s.flags&flagBinding != 0 {
		s.bindingID = p.take(bindingIDSize)
	}
	s.clientID = string(p.vec16())
	s.clientPK = p.exact16(s.suite.PublicKeySize())
	if !p.ok() || len(s.secret) != s.suite.Hash().Size() || !validSPIFFEID(s.clientID) {
		return nil, errMalformed
	}
	return s, nil
}

// openTicket decrypts and checks a ticket sealed to serverID at time now.
func (t *TicketKeys) openTicket(ticket []byte, serverID string, now time.Time) (*ticketState, error) {
	s, _, err := t.openTicketSerial(ticket, serverID, now)
	return s, err
}

// openTicketSerial is openTicket, also returning the serial of the key that opened it.
func (t *TicketKeys) openTicketSerial(ticket []byte, serverID string, now time.Time) (*ticketState, uint64, error) {
	pt, serial, err := t.openSerial(ticket, serverID, now)
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

// Has reports whether tickets sealed with key id are accepted now: id is the current or
// the previous key, and the previous key's period is not over.
func (t *TicketKeys) Has(id uint32) bool {
	t.maintain(t.now())
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.current.id == id || (t.previous != nil && t.previous.id == id)
}

// openTicketHeader opens the base64url ticket of a request header, sealed to the server
// self, at time now, through cache, and keeps its session there for the short form.
func (t *TicketKeys) openTicketHeader(cache *ticketCache, header string, self *Credential, now time.Time) (*ticketState, error) {
	t.maintain(now)
	gen := t.gen.Load()
	if st := cache.get(t, header, gen); st != nil {
		if unixSeconds(now) >= st.expiry {
			return nil, errTicketExpired
		}
		return st, nil
	}
	ticket, err := base64.RawURLEncoding.Strict().DecodeString(header) // one spelling per ticket (its cache key)
	if err != nil {
		return nil, errMalformed
	}
	st, serial, err := t.openTicketSerial(ticket, self.spiffeID, now)
	if err != nil {
		return nil, err
	}
	st.secretKey = callRoot(st.suite.Hash(), st.secret, self.spiffeID, st.serverHash)
	cache.put(t, header, st, serial, gen, unixSeconds(now))
	return st, nil
}

// openSessionHeader finds the session a short-form request names (spec 6.6).
func (t *TicketKeys) openSessionHeader(cache *ticketCache, header string, now time.Time) (*ticketState, error) {
	var sid [sessionIDSize]byte
	if base64.RawURLEncoding.EncodedLen(sessionIDSize) != len(header) {
		return nil, errMalformed
	}
	if n, err := base64.RawURLEncoding.Strict().Decode(sid[:], []byte(header)); err != nil || n != sessionIDSize {
		return nil, errMalformed
	}
	t.maintain(now)
	st := cache.getSession(t, sid, t.gen.Load())
	if st == nil {
		return nil, errUnknownSession
	}
	if unixSeconds(now) >= st.expiry {
		return nil, errTicketExpired
	}
	return st, nil
}
