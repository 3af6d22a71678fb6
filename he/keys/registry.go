package keys

import (
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/veilrpc/veil/he"
)

// Registry holds clients' evaluation keys on the server side. Keys are uploaded once
// (UploadEvaluationKeys streams them in chunks, resumably), content-addressed by the
// SHA-256 of their encoding, and owned by the uploader's identity (a SPIFFE ID): any
// other identity naming that key ID is refused with permission_denied.
//
// Memory is bounded, and no identity can take another's room. The budget is split:
// partial uploads live in their own share (WithUploadBudget) and are charged only the
// bytes that have arrived (a header costs nothing), so they never evict a complete key
// set; parsed key sets use the rest, each charged its in-memory size (MemorySize)
// before it is parsed, room being made by evicting the least recently used sets. Per
// identity (WithIdentityQuota), the bytes held (parsed sets plus partial uploads) and
// the number of partial uploads are bounded: an identity over its quota evicts its own
// sets, never another's. A header must declare the exact encoded size of a key set
// (EncodedSize of some manifest). A partial upload is dropped uploadTTL after its
// first header, however often it is resumed. What cannot fit is refused with
// resource_exhausted. Key sets expire TTL after their last use. With a KeyStore
// (WithStore for a directory, WithKeyStore for a shared store such as NATS JetStream),
// complete key sets are also saved there before an upload is acknowledged, so that
// eviction, restarts and other replicas do not lose them; expiry deletes them there
// too. A key set that is gone is not_found with an EvaluationKeysMissing detail: the
// client library uploads it again and retries once. A store that fails is
// unavailable: the client retries, and nothing acknowledged is lost.
type Registry struct {
	params *he.Parameters
	cfg    registryConfig

	mu         sync.Mutex
	used       int64 // parsed sets, store reads and partial uploads
	uploadUsed int64 // the partial uploads' part of used
	entries    map[he.KeyID]*regEntry
	lru        *list.List            // of *regEntry, most recent at the front
	uploads    map[uploadKey]*upload // partial uploads, per uploader: no identity can block another's
	owned      map[string]int64      // bytes charged per identity
	nUploads   map[string]int        // partial uploads per identity
}

type uploadKey struct {
	owner string
	id    he.KeyID
}

type registryConfig struct {
	budget       int64
	uploadBudget int64
	idBytes      int64
	idUploads    int
	ttl          time.Duration
	uploadTTL    time.Duration
	maxSet       int64
	pool         *he.WorkerPool
	dir          string
	store        KeyStore
	timeout      time.Duration
	now          func() time.Time
}

// RegistryOption configures NewRegistry.
type RegistryOption interface{ applyRegistry(*registryConfig) }

type registryOptionFunc func(*registryConfig)

func (f registryOptionFunc) applyRegistry(c *registryConfig) { f(c) }

// WithMemoryBudget bounds the bytes the registry holds: parsed keys plus partial
// uploads (default 1 GiB).
func WithMemoryBudget(bytes int64) RegistryOption {
	return registryOptionFunc(func(c *registryConfig) { c.budget = bytes })
}

// WithUploadBudget sets the part of the memory budget kept for partial uploads
// (default a quarter). Parsed key sets use the rest, so uploads always have room
// without evicting a complete set, and partial uploads can never crowd the sets out.
func WithUploadBudget(bytes int64) RegistryOption {
	return registryOptionFunc(func(c *registryConfig) { c.uploadBudget = bytes })
}

// WithIdentityQuota bounds what one identity may hold: bytes (its parsed key sets and
// partial uploads; default half the budget) and concurrent partial uploads (default
// 2). An identity over its byte quota evicts its own least recently used sets; a
// partial upload over it, or one upload too many, is resource_exhausted.
func WithIdentityQuota(bytes int64, uploads int) RegistryOption {
	return registryOptionFunc(func(c *registryConfig) { c.idBytes, c.idUploads = bytes, uploads })
}

// WithTTL sets how long a key set lives after its last use (default 24 hours) and how
// long an upload may take from its first header (default 1 hour; resuming does not
// extend it).
func WithTTL(keys, uploads time.Duration) RegistryOption {
	return registryOptionFunc(func(c *registryConfig) { c.ttl, c.uploadTTL = keys, uploads })
}

// WithMaxKeySetSize bounds one encoded key set (default: half the upload budget).
func WithMaxKeySetSize(bytes int64) RegistryOption {
	return registryOptionFunc(func(c *registryConfig) { c.maxSet = bytes })
}

// WithEvaluatorPool makes the registry's evaluators share pool (default: a pool of
// GOMAXPROCS workers), so that the evaluation buffers are bounded by the pool's size,
// not by the number of key sets.
func WithEvaluatorPool(pool *he.WorkerPool) RegistryOption {
	return registryOptionFunc(func(c *registryConfig) { c.pool = pool })
}

// WithStore keeps complete key sets in dir as well (a DirStore: created 0700 if
// missing; files 0600, written atomically), so that eviction and restarts do not lose
// them.
func WithStore(dir string) RegistryOption {
	return registryOptionFunc(func(c *registryConfig) { c.dir = dir })
}

// WithKeyStore keeps complete key sets in store as well. Every store operation is
// bounded by timeout (default 30 seconds).
func WithKeyStore(store KeyStore, timeout time.Duration) RegistryOption {
	return registryOptionFunc(func(c *registryConfig) { c.store, c.timeout = store, timeout })
}

// WithClock replaces time.Now (tests).
func WithClock(now func() time.Time) RegistryOption {
	return registryOptionFunc(func(c *registryConfig) { c.now = now })
}

type regEntry struct {
	id      he.KeyID
	owner   string
	keys    *he.EvaluationKeys
	eval    *he.Evaluator
	mem     int64
	expires time.Time
	touched time.Time // last time the disk copy's mtime was refreshed
	elem    *list.Element
}

type upload struct {
	id       he.KeyID
	owner    string
	total    int64
	buf      []byte
	charged  int64     // cap(buf), charged to the upload budget and the owner
	expires  time.Time // uploadTTL after the first header; never renewed
	gen      int       // incremented when a new stream takes the upload over
	complete bool
}

// NewRegistry returns an empty registry for params.
func NewRegistry(params *he.Parameters, opts ...RegistryOption) (_ *Registry, err error) {
	if params == nil {
		return nil, invalidf("nil parameters")
	}
	cfg := registryConfig{budget: 1 << 30, ttl: 24 * time.Hour, uploadTTL: time.Hour, now: time.Now}
	for _, o := range opts {
		o.applyRegistry(&cfg)
	}
	if cfg.uploadBudget == 0 {
		cfg.uploadBudget = cfg.budget / 4
	}
	if cfg.maxSet == 0 {
		cfg.maxSet = cfg.uploadBudget / 2
	}
	if cfg.idBytes == 0 {
		cfg.idBytes = cfg.budget / 2
	}
	if cfg.idUploads == 0 {
		cfg.idUploads = 2
	}
	if cfg.budget <= 0 || cfg.ttl <= 0 || cfg.uploadTTL <= 0 || cfg.maxSet <= 0 || cfg.idBytes <= 0 || cfg.idUploads <= 0 {
		return nil, invalidf("registry: budget, quotas, TTLs and maximum size must be positive")
	}
	if cfg.uploadBudget <= 0 || cfg.uploadBudget >= cfg.budget {
		return nil, invalidf("registry: the upload budget must be positive and below the memory budget")
	}
	if cfg.dir != "" {
		if cfg.store != nil {
			return nil, invalidf("registry: WithStore and WithKeyStore are exclusive")
		}
		d, err := NewDirStore(cfg.dir)
		if err != nil {
			return nil, err
		}
		cfg.store = d
	}
	if cfg.timeout <= 0 {
		cfg.timeout = 30 * time.Second
	}
	if cfg.pool == nil {
		if cfg.pool, err = he.NewWorkerPool(params, runtime.GOMAXPROCS(0)); err != nil {
			return nil, err
		}
	} else if cfg.pool.Params().ID() != params.ID() {
		return nil, paramMismatch("worker pool", cfg.pool.Params().ID(), params.ID())
	}
	return &Registry{params: params, cfg: cfg, entries: map[he.KeyID]*regEntry{}, lru: list.New(), uploads: map[uploadKey]*upload{},
		owned: map[string]int64{}, nUploads: map[string]int{}}, nil
}

// WorkerPool returns the pool the registry's evaluators share.
func (r *Registry) WorkerPool() *he.WorkerPool { return r.cfg.pool }

// Used returns the bytes currently charged against the budget.
func (r *Registry) Used() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.used
}

// setsBudget is the part of the budget parsed key sets (and store reads) may use.
func (r *Registry) setsBudget() int64 { return r.cfg.budget - r.cfg.uploadBudget }

// reserve charges n bytes of parsed keys (or a store read) to owner: first within
// owner's quota, evicting owner's own least recently used sets, then within the sets'
// budget, evicting the least recently used sets. r.mu must be held.
func (r *Registry) reserve(owner string, n int64) error {
	r.expireLocked()
	if n > r.setsBudget() || n > r.cfg.idBytes {
		return exhaustedf("a key set of %d bytes in memory exceeds this registry's quota", n)
	}
	if err := r.makeRoomFor(owner, n); err != nil {
		return err
	}
	for r.used-r.uploadUsed+n > r.setsBudget() {
		back := r.lru.Back()
		if back == nil {
			return exhaustedf("registry memory budget of %d bytes exhausted", r.cfg.budget)
		}
		r.dropLocked(back.Value.(*regEntry), false)
	}
	r.charge(owner, n)
	return nil
}

// makeRoomFor evicts owner's own least recently used sets until n more bytes fit in
// its quota. r.mu must be held.
func (r *Registry) makeRoomFor(owner string, n int64) error {
	for el := r.lru.Back(); r.owned[owner]+n > r.cfg.idBytes; {
		for el != nil && el.Value.(*regEntry).owner != owner {
			el = el.Prev()
		}
		if el == nil {
			return exhaustedf("identity quota of %d bytes exhausted", r.cfg.idBytes)
		}
		prev := el.Prev()
		r.dropLocked(el.Value.(*regEntry), false)
		el = prev
	}
	return nil
}

// charge adds n (negative to release) to the total and to owner's share.
func (r *Registry) charge(owner string, n int64) {
	r.used += n
	if r.owned[owner] += n; r.owned[owner] == 0 {
		delete(r.owned, owner)
	}
}

// dropUploadLocked forgets a partial upload and releases its bytes.
func (r *Registry) dropUploadLocked(u *upload) {
	delete(r.uploads, uploadKey{u.owner, u.id})
	r.charge(u.owner, -u.charged)
	r.uploadUsed -= u.charged
	u.charged = 0
	if r.nUploads[u.owner]--; r.nUploads[u.owner] <= 0 {
		delete(r.nUploads, u.owner)
	}
}

// dropLocked removes an entry from memory; expired also deletes its disk copy.
func (r *Registry) dropLocked(e *regEntry, expired bool) {
	r.lru.Remove(e.elem)
	delete(r.entries, e.id)
	r.charge(e.owner, -e.mem)
	if expired && r.cfg.store != nil {
		go func(id he.KeyID) {
			ctx, cancel := r.storeCtx()
			defer cancel()
			_ = r.cfg.store.Delete(ctx, id)
		}(e.id)
	}
}

func (r *Registry) storeCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), r.cfg.timeout)
}

func (r *Registry) expireLocked() {
	now := r.cfg.now()
	for _, e := range r.entries {
		if now.After(e.expires) {
			r.dropLocked(e, true)
		}
	}
	for _, u := range r.uploads {
		if now.After(u.expires) {
			r.dropUploadLocked(u)
		}
	}
}

// Put registers an encoded key set for owner and returns its key ID. Registering the
// same key set again refreshes it.
func (r *Registry) Put(owner string, data []byte) (he.KeyID, error) {
	if owner == "" {
		return "", permissionf("no caller identity")
	}
	sum := sha256.Sum256(data)
	id := he.KeyID(hex.EncodeToString(sum[:]))
	if int64(len(data)) > r.cfg.maxSet {
		return "", exhaustedf("key set of %d bytes exceeds the maximum %d", len(data), r.cfg.maxSet)
	}
	r.mu.Lock()
	if e, ok := r.entries[id]; ok {
		defer r.mu.Unlock()
		if e.owner != owner {
			return "", permissionf("evaluation keys %s belong to another identity", short(id))
		}
		r.useLocked(e)
		return id, nil
	}
	r.mu.Unlock()
	found := false
	if r.cfg.store != nil {
		owner2, ok, err := r.storedOwner(id)
		if err != nil {
			return "", err
		}
		if ok && owner2 != owner {
			return "", permissionf("evaluation keys %s belong to another identity", short(id))
		}
		found = ok
	}
	if err := r.admit(id, owner, data); err != nil {
		return "", err
	}
	if r.cfg.store != nil && !found {
		// Saved before it is acknowledged: an acknowledged upload survives this
		// process and is visible to every replica sharing the store.
		ctx, cancel := r.storeCtx()
		err := r.cfg.store.Save(ctx, id, owner, data)
		cancel()
		if err != nil {
			r.mu.Lock()
			if e, ok := r.entries[id]; ok {
				r.dropLocked(e, false)
			}
			r.mu.Unlock()
			var (
				ke  *keyError
				hee *he.Error
			)
			if errors.As(err, &ke) || errors.As(err, &hee) {
				return "", err
			}
			return "", storeUnavailable()
		}
	}
	return id, nil
}

// admit charges, parses and inserts a key set.
func (r *Registry) admit(id he.KeyID, owner string, data []byte) error {
	mem, err := he.KeySetMemory(r.params, data)
	if err != nil {
		return err
	}
	r.mu.Lock()
	if err := r.reserve(owner, mem); err != nil {
		r.mu.Unlock()
		return err
	}
	r.mu.Unlock()
	keys, err := he.ParseEvaluationKeys(r.params, data)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.charge(owner, -mem)
		return err
	}
	if old, ok := r.entries[id]; ok { // registered concurrently
		r.charge(owner, -mem)
		if old.owner != owner {
			return permissionf("evaluation keys %s belong to another identity", short(id))
		}
		r.useLocked(old)
		return nil
	}
	e := &regEntry{id: id, owner: owner, keys: keys, mem: mem, touched: r.cfg.now()}
	e.elem = r.lru.PushFront(e)
	r.entries[id] = e
	r.useLocked(e)
	return nil
}

func (r *Registry) useLocked(e *regEntry) {
	now := r.cfg.now()
	e.expires = now.Add(r.cfg.ttl)
	r.lru.MoveToFront(e.elem)
	if r.cfg.store != nil && now.Sub(e.touched) > r.cfg.ttl/16 {
		e.touched = now
		go func(id he.KeyID) {
			ctx, cancel := r.storeCtx()
			defer cancel()
			_ = r.cfg.store.Touch(ctx, id)
		}(e.id)
	}
}

// Keys returns owner's key set id. A set owned by another identity is
// permission_denied; a missing, expired or evicted one (not on disk either) is
// not_found, telling the client to upload it again.
func (r *Registry) Keys(owner string, id he.KeyID) (*he.EvaluationKeys, error) {
	e, err := r.entry(owner, id)
	if err != nil {
		return nil, err
	}
	return e.keys, nil
}

// Evaluator returns an evaluator over owner's key set id, built once per key set.
func (r *Registry) Evaluator(owner string, id he.KeyID) (*he.Evaluator, error) {
	e, err := r.entry(owner, id)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if e.eval == nil {
		ev, err := he.NewEvaluator(r.params, e.keys, he.WithWorkerPool(r.cfg.pool))
		if err != nil {
			return nil, err
		}
		e.eval = ev
	}
	return e.eval, nil
}

func (r *Registry) entry(owner string, id he.KeyID) (*regEntry, error) {
	if owner == "" {
		return nil, permissionf("no caller identity")
	}
	if !validKeyID(string(id)) {
		return nil, invalidf("malformed key ID")
	}
	r.mu.Lock()
	r.expireLocked()
	if e, ok := r.entries[id]; ok {
		defer r.mu.Unlock()
		if e.owner != owner {
			return nil, permissionf("evaluation keys %s belong to another identity", short(id))
		}
		r.useLocked(e)
		return e, nil
	}
	r.mu.Unlock()
	if r.cfg.store == nil {
		return nil, keysMissing(id, "not held (expired, evicted or never uploaded)")
	}
	diskOwner, data, release, err := r.readStore(id)
	if err != nil {
		return nil, err
	}
	defer release()
	if diskOwner != owner {
		return nil, permissionf("evaluation keys %s belong to another identity", short(id))
	}
	if err := r.admit(id, owner, data); err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.entries[id]
	if !ok {
		return nil, keysMissing(id, "evicted while loading")
	}
	return e, nil
}

// storedOwner returns the owner of a stored key set; found is false when the store
// has none (or it expired there).
func (r *Registry) storedOwner(id he.KeyID) (owner string, found bool, err error) {
	ctx, cancel := r.storeCtx()
	defer cancel()
	info, err := r.cfg.store.Stat(ctx, id)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "", false, nil
	case err != nil:
		return "", false, storeUnavailable()
	case r.cfg.now().After(info.Modified.Add(r.cfg.ttl)):
		return "", false, nil
	}
	return info.Owner, true, nil
}

// readStore reads a stored key set, honouring its TTL (last save or touch + TTL). The
// set's size stays charged against the budget until the caller calls release.
func (r *Registry) readStore(id he.KeyID) (owner string, data []byte, release func(), err error) {
	ctx, cancel := r.storeCtx()
	defer cancel()
	info, err := r.cfg.store.Stat(ctx, id)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil, nil, keysMissing(id, "not held (expired, evicted or never uploaded)")
	}
	if err != nil {
		return "", nil, nil, storeUnavailable()
	}
	if r.cfg.now().After(info.Modified.Add(r.cfg.ttl)) {
		_ = r.cfg.store.Delete(ctx, id)
		return "", nil, nil, keysMissing(id, "expired")
	}
	if info.Size > r.cfg.maxSet || info.Size < 0 {
		return "", nil, nil, internalf("registry store: oversized key set %s", short(id))
	}
	// The stored bytes are charged to their owner while they are read and parsed.
	r.mu.Lock()
	err = r.reserve(info.Owner, info.Size)
	r.mu.Unlock()
	if err != nil {
		return "", nil, nil, err
	}
	release = func() {
		r.mu.Lock()
		r.charge(info.Owner, -info.Size)
		r.mu.Unlock()
	}
	data, err = r.cfg.store.Load(ctx, id)
	if err != nil {
		release()
		if errors.Is(err, fs.ErrNotExist) {
			return "", nil, nil, keysMissing(id, "not held (expired, evicted or never uploaded)")
		}
		return "", nil, nil, storeUnavailable()
	}
	sum := sha256.Sum256(data)
	if int64(len(data)) != info.Size || he.KeyID(hex.EncodeToString(sum[:])) != id {
		release()
		return "", nil, nil, internalf("registry store: corrupt copy of %s", short(id))
	}
	return info.Owner, data, release, nil
}

// beginUpload opens or resumes owner's upload of id at offset. A new stream takes an
// interrupted one over; the previous stream's later chunks are refused. Nothing is
// charged until chunks arrive, and resuming does not extend the upload's deadline.
func (r *Registry) beginUpload(owner string, id he.KeyID, pid he.ParamID, total, offset int64) (*upload, int, error) {
	if owner == "" {
		return nil, 0, permissionf("no caller identity")
	}
	if pid != r.params.ID() {
		return nil, 0, paramMismatch("upload", pid, r.params.ID())
	}
	mem, ok := he.KeySetMemoryForSize(r.params, total)
	if !ok {
		return nil, 0, invalidf("upload of %s: %d bytes is not the size of an evaluation-key set", short(id), total)
	}
	if total > r.cfg.maxSet || mem > r.setsBudget() || mem > r.cfg.idBytes {
		return nil, 0, exhaustedf("key set of %d bytes (%d in memory) exceeds the maximum %d", total, mem, r.cfg.maxSet)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.expireLocked()
	if e, ok := r.entries[id]; ok {
		if e.owner != owner {
			return nil, 0, permissionf("evaluation keys %s belong to another identity", short(id))
		}
		r.useLocked(e)
		return &upload{id: id, owner: owner, total: total, complete: true}, 0, nil
	}
	if u, ok := r.uploads[uploadKey{owner, id}]; ok {
		if u.total != total {
			return nil, 0, invalidf("upload of %s: size %d, earlier %d", short(id), total, u.total)
		}
		if offset != int64(len(u.buf)) && offset != 0 {
			return nil, 0, preconditionf("upload of %s: resume from offset %d, not %d", short(id), len(u.buf), offset)
		}
		u.buf = u.buf[:offset]
		u.gen++
		return u, u.gen, nil
	}
	if offset != 0 {
		return nil, 0, preconditionf("upload of %s: no partial upload to resume, start from offset 0", short(id))
	}
	if r.nUploads[owner] >= r.cfg.idUploads {
		return nil, 0, exhaustedf("%d uploads already in progress for this identity", r.nUploads[owner])
	}
	r.nUploads[owner]++
	u := &upload{id: id, owner: owner, total: total, expires: r.cfg.now().Add(r.cfg.uploadTTL)}
	r.uploads[uploadKey{owner, id}] = u
	return u, 0, nil
}

// appendChunk adds a chunk to an upload opened by the stream of generation gen. The
// buffer grows as chunks arrive; each growth is charged before it is allocated, to
// the upload budget and to the owner's quota (evicting the owner's own sets, never
// another identity's).
func (r *Registry) appendChunk(u *upload, gen int, chunk []byte) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.expireLocked()
	if cur, ok := r.uploads[uploadKey{u.owner, u.id}]; !ok || cur != u {
		return 0, keysMissing(u.id, "upload expired")
	}
	if u.gen != gen {
		return 0, newErr(abortedCode, "upload of %s taken over by another stream", short(u.id))
	}
	need := int64(len(u.buf)) + int64(len(chunk))
	if need > u.total {
		return 0, invalidf("upload of %s: more than the declared %d bytes", short(u.id), u.total)
	}
	if need > int64(cap(u.buf)) {
		grown := min(u.total, max(need, 2*int64(cap(u.buf)), 64<<10))
		// The old and the new buffer coexist while the bytes are copied.
		if r.uploadUsed+grown > r.cfg.uploadBudget {
			return 0, exhaustedf("upload budget of %d bytes exhausted: retry later", r.cfg.uploadBudget)
		}
		if err := r.makeRoomFor(u.owner, grown); err != nil {
			return 0, err
		}
		r.charge(u.owner, grown)
		r.uploadUsed += grown
		buf := make([]byte, len(u.buf), grown)
		copy(buf, u.buf)
		r.charge(u.owner, -u.charged)
		r.uploadUsed -= u.charged
		u.buf, u.charged = buf, grown
	}
	u.buf = append(u.buf, chunk...)
	return int64(len(u.buf)), nil
}

// abandonUpload drops an upload whose stream sent invalid data, so that it holds
// neither bytes nor one of its owner's upload slots.
func (r *Registry) abandonUpload(u *upload, gen int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur, ok := r.uploads[uploadKey{u.owner, u.id}]; ok && cur == u && u.gen == gen {
		r.dropUploadLocked(u)
	}
}

// finishUpload verifies and registers a fully received upload.
func (r *Registry) finishUpload(u *upload, gen int) error {
	r.mu.Lock()
	if cur, ok := r.uploads[uploadKey{u.owner, u.id}]; !ok || cur != u || u.gen != gen {
		r.mu.Unlock()
		return newErr(abortedCode, "upload of %s taken over by another stream", short(u.id))
	}
	delete(r.uploads, uploadKey{u.owner, u.id})
	if r.nUploads[u.owner]--; r.nUploads[u.owner] <= 0 {
		delete(r.nUploads, u.owner)
	}
	// The buffer stays charged to the upload budget until the set is registered, but
	// no longer to the owner's quota: its parsed form replaces it there.
	charged := u.charged
	r.charge(u.owner, -charged)
	r.used += charged
	data := u.buf
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.used -= charged
		r.uploadUsed -= charged
		r.mu.Unlock()
	}()
	sum := sha256.Sum256(data)
	if got := he.KeyID(hex.EncodeToString(sum[:])); got != u.id {
		return invalidf("upload: content hashes to %s, not the declared key ID %s", short(got), short(u.id))
	}
	if _, err := r.Put(u.owner, data); err != nil {
		return err
	}
	return nil
}

// status returns how many bytes of owner's upload of id the registry holds.
func (r *Registry) status(owner string, id he.KeyID) (received, total int64, complete bool, err error) {
	r.mu.Lock()
	r.expireLocked()
	if e, ok := r.entries[id]; ok {
		defer r.mu.Unlock()
		if e.owner != owner {
			return 0, 0, false, permissionf("evaluation keys %s belong to another identity", short(id))
		}
		return 0, 0, true, nil
	}
	if u, ok := r.uploads[uploadKey{owner, id}]; ok {
		defer r.mu.Unlock()
		return int64(len(u.buf)), u.total, false, nil
	}
	r.mu.Unlock()
	if r.cfg.store != nil {
		o, found, err := r.storedOwner(id)
		if err != nil {
			return 0, 0, false, err
		}
		if found {
			if o != owner {
				return 0, 0, false, permissionf("evaluation keys %s belong to another identity", short(id))
			}
			return 0, 0, true, nil
		}
	}
	return 0, 0, false, nil
}

// String describes the registry's occupancy.
func (r *Registry) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return fmt.Sprintf("keys.Registry{keys: %d, uploads: %d, used: %s/%s}", len(r.entries), len(r.uploads),
		strconv.FormatInt(r.used, 10), strconv.FormatInt(r.cfg.budget, 10))
}

// short abbreviates a key ID for error texts and logs.
func short(id he.KeyID) string {
	if len(id) > 16 {
		return string(id[:16])
	}
	return string(id)
}

// validKeyID reports whether s is a key ID: 64 lowercase hex digits.
func validKeyID(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, c := range []byte(s) {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
