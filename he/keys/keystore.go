package keys

import (
	"context"
	"errors"
	"io/fs"
	"strings"
	"time"

	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/internal/dirstore"
)

// KeyStore keeps complete encoded evaluation-key sets outside the process, so that
// eviction and restarts do not lose them and, with a shared store, so that every
// replica of a service can use the key sets uploaded through any of them. A Registry
// uses its store as the durable copy behind its in-memory cache: an upload is
// acknowledged only after Save returned, and a key set missing from memory is loaded
// back with Load.
//
// DirStore is the embedded store (a directory). A shared store is any type with these
// methods, such as the NATS JetStream Object Store of package natsstate. Methods
// report a missing key set with an error matching fs.ErrNotExist; any other error
// means the store is unreachable or failing, which the registry reports as
// unavailable (the client retries) and never as a missing key set.
//
// The registry checks everything it loads: the content must hash to its key ID and
// parse under the registry's parameters, so a store needs no more trust than it is
// given durability.
type KeyStore interface {
	// Save stores data as key set id owned by owner, durably, before it returns.
	Save(ctx context.Context, id he.KeyID, owner string, data []byte) error
	// Stat returns what is known of a stored key set without reading it.
	Stat(ctx context.Context, id he.KeyID) (KeyInfo, error)
	// Load returns a stored key set's encoding.
	Load(ctx context.Context, id he.KeyID) ([]byte, error)
	// Touch records a use of a stored key set (its Modified time becomes now).
	Touch(ctx context.Context, id he.KeyID) error
	// Delete removes a stored key set; deleting a missing one is not an error.
	Delete(ctx context.Context, id he.KeyID) error
}

// KeyInfo describes a stored key set.
type KeyInfo struct {
	Owner    string    // the SPIFFE ID that uploaded it
	Size     int64     // bytes of its encoding
	Modified time.Time // when it was saved or last touched
}

// DirStore is a KeyStore in a local directory: one file per key set, written 0600 and
// atomically (a temporary file renamed into place), named by key ID.
type DirStore struct{ dir *dirstore.Dir }

// NewDirStore returns a store in dir, creating it (0700) if missing.
func NewDirStore(dir string) (*DirStore, error) {
	d, err := dirstore.Open(dir, "he: key store")
	if err != nil {
		return nil, internalf("registry: cannot create the store")
	}
	return &DirStore{dir: d}, nil
}

var _ KeyStore = (*DirStore)(nil)

// Store format: "VHKS1\n<owner>\n" followed by the encoded key set.
const storeMagic = "VHKS1\n"

func fileName(id he.KeyID) string { return string(id) + ".vhk" }

// Save implements KeyStore.
func (d *DirStore) Save(_ context.Context, id he.KeyID, owner string, data []byte) error {
	if !validKeyID(string(id)) {
		return invalidf("malformed key ID")
	}
	if strings.ContainsAny(owner, "\n\x00") {
		return invalidf("identity contains a newline")
	}
	return d.dir.Write(fileName(id), []byte(storeMagic+owner+"\n"), data)
}

// Stat implements KeyStore.
func (d *DirStore) Stat(_ context.Context, id he.KeyID) (KeyInfo, error) {
	if !validKeyID(string(id)) {
		return KeyInfo{}, fs.ErrNotExist
	}
	head, size, mod, err := d.dir.ReadHead(fileName(id), len(storeMagic)+512)
	if err != nil {
		return KeyInfo{}, err
	}
	owner, rest, ok := parseStoreHeader(head)
	if !ok {
		return KeyInfo{}, errors.New("he: key store: corrupt file")
	}
	return KeyInfo{Owner: owner, Size: size - int64(len(head)-len(rest)), Modified: mod}, nil
}

// Load implements KeyStore.
func (d *DirStore) Load(_ context.Context, id he.KeyID) ([]byte, error) {
	if !validKeyID(string(id)) {
		return nil, fs.ErrNotExist
	}
	b, err := d.dir.Read(fileName(id))
	if err != nil {
		return nil, err
	}
	_, data, ok := parseStoreHeader(b)
	if !ok {
		return nil, errors.New("he: key store: corrupt file")
	}
	return data, nil
}

// Touch implements KeyStore.
func (d *DirStore) Touch(_ context.Context, id he.KeyID) error {
	return d.dir.Touch(fileName(id))
}

// Delete implements KeyStore.
func (d *DirStore) Delete(_ context.Context, id he.KeyID) error {
	return d.dir.Delete(fileName(id))
}

func parseStoreHeader(b []byte) (owner string, rest []byte, ok bool) {
	if !strings.HasPrefix(string(b), storeMagic) {
		return "", nil, false
	}
	b = b[len(storeMagic):]
	i := strings.IndexByte(string(b), '\n')
	if i <= 0 {
		return "", nil, false
	}
	return string(b[:i]), b[i+1:], true
}

// storeUnavailable is the error a registry returns when its store fails: unavailable,
// so clients retry, and never not_found, which would make them upload again.
func storeUnavailable() error {
	return newErr(unavailableCode, "evaluation-key store unavailable")
}
