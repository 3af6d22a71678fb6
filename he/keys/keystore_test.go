package keys

import (
	"context"
	"errors"
	"io/fs"
	"sync"
	"testing"
	"time"

	"github.com/veilrpc/veil/he"

	"connectrpc.com/connect"
)

// memStore is a shared KeyStore in memory that can be made to fail, standing in for a
// store shared by replicas (natsstate's tests run the real engine).
type memStore struct {
	mu    sync.Mutex
	sets  map[he.KeyID][]byte
	info  map[he.KeyID]KeyInfo
	fail  bool
	saves int
}

func newMemStore() *memStore {
	return &memStore{sets: map[he.KeyID][]byte{}, info: map[he.KeyID]KeyInfo{}}
}

var errDown = errors.New("store down")

func (m *memStore) Save(_ context.Context, id he.KeyID, owner string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail {
		return errDown
	}
	m.saves++
	m.sets[id] = append([]byte(nil), data...)
	m.info[id] = KeyInfo{Owner: owner, Size: int64(len(data)), Modified: time.Now()}
	return nil
}

func (m *memStore) Stat(_ context.Context, id he.KeyID) (KeyInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail {
		return KeyInfo{}, errDown
	}
	i, ok := m.info[id]
	if !ok {
		return KeyInfo{}, fs.ErrNotExist
	}
	return i, nil
}

func (m *memStore) Load(_ context.Context, id he.KeyID) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail {
		return nil, errDown
	}
	b, ok := m.sets[id]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return append([]byte(nil), b...), nil
}

func (m *memStore) Touch(context.Context, he.KeyID) error { return nil }

func (m *memStore) Delete(_ context.Context, id he.KeyID) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.sets, id)
	delete(m.info, id)
	return nil
}

func (m *memStore) setFail(v bool) { m.mu.Lock(); m.fail = v; m.mu.Unlock() }

// Two registries sharing one store act as two replicas: a key set uploaded through one
// is used by the other, ownership holds across them, and a failing store is
// unavailable (retry), never not_found (re-upload) and never an acknowledged upload
// that was not saved.
func TestRegistrySharedStore(t *testing.T) {
	s := newSmallSet(t)
	store := newMemStore()
	r1, err := NewRegistry(smallParams(), WithKeyStore(store, time.Second))
	if err != nil {
		t.Fatal(err)
	}
	r2, _ := NewRegistry(smallParams(), WithKeyStore(store, time.Second))

	store.setFail(true)
	if _, err := r1.Put("spiffe://t/a", s.data); CodeOf(err) != connect.CodeUnavailable {
		t.Fatalf("put with the store down: %v, want unavailable", err)
	}
	if r1.Used() != 0 {
		t.Errorf("a refused upload still holds %d bytes", r1.Used())
	}
	if _, err := r2.Keys("spiffe://t/a", s.id); CodeOf(err) != connect.CodeUnavailable {
		t.Errorf("lookup with the store down: %v, want unavailable", err)
	}
	store.setFail(false)

	if _, err := r1.Put("spiffe://t/a", s.data); err != nil {
		t.Fatal(err)
	}
	if _, err := r2.Keys("spiffe://t/b", s.id); CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("other identity on replica 2: %v", err)
	}
	if _, err := r2.Put("spiffe://t/b", s.data); CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("other identity re-uploading on replica 2: %v", err)
	}
	ev, err := r2.Evaluator("spiffe://t/a", s.id)
	if err != nil || ev == nil {
		t.Fatalf("replica 2 with keys uploaded through replica 1: %v", err)
	}
	if _, _, complete, err := r2.status("spiffe://t/a", s.id); err != nil || !complete {
		t.Errorf("upload status on replica 2: complete=%v %v", complete, err)
	}
	if _, err := r2.Put("spiffe://t/a", s.data); err != nil || store.saves != 1 {
		t.Errorf("re-registering a stored set: %v, %d saves (want 1)", err, store.saves)
	}

	// A store that returns other bytes than it was given is caught by the key ID.
	store.mu.Lock()
	store.sets[s.id][len(store.sets[s.id])-1] ^= 1
	store.mu.Unlock()
	r3, _ := NewRegistry(smallParams(), WithKeyStore(store, time.Second))
	if _, err := r3.Keys("spiffe://t/a", s.id); CodeOf(err) != connect.CodeInternal || r3.Used() != 0 {
		t.Errorf("tampered store copy: %v, used %d", err, r3.Used())
	}
}
