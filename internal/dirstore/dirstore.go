// Package dirstore keeps records as files under one directory: the embedded store
// behind he/keys.DirStore and analytics.DirStore. Every record is written 0600 and
// atomically (internal/atomicfile), folders are created 0700, and errors say only
// what a caller may act on: a missing record matches fs.ErrNotExist, a taken name
// (Create) fs.ErrExist, and anything else is "<prefix>: i/o error", without the path
// or the operating system's text, which may reach a peer.
//
// Names are slash-separated paths relative to the root ("study-1/study.pb"); a name
// that is not local (filepath.IsLocal: absolute, empty, or climbing out with "..") is
// refused as missing, so a caller's validation is not the only guard.
package dirstore

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/veilrpc/veil/internal/atomicfile"
)

// Dir is a store rooted at one directory. Its methods are safe for concurrent use by
// goroutines and processes (each write is one rename or one hard link).
type Dir struct {
	root   string
	ioErr  error
	prefix string
}

// Open returns the store rooted at root, creating it (0700) if missing. prefix starts
// every error text ("he: key store").
func Open(root, prefix string) (*Dir, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, errors.New(prefix + ": cannot create the store")
	}
	return &Dir{root: root, prefix: prefix, ioErr: errors.New(prefix + ": i/o error")}, nil
}

func (d *Dir) path(name string) (string, error) {
	if !filepath.IsLocal(filepath.FromSlash(name)) {
		return "", fs.ErrNotExist
	}
	return filepath.Join(d.root, filepath.FromSlash(name)), nil
}

// err keeps fs.ErrNotExist and fs.ErrExist recognisable and drops everything else's
// text (paths, the system's messages).
func (d *Dir) err(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return fs.ErrNotExist
	case errors.Is(err, fs.ErrExist):
		return fs.ErrExist
	default:
		return d.ioErr
	}
}

// Write replaces the record name with the concatenation of parts.
func (d *Dir) Write(name string, parts ...[]byte) error {
	p, err := d.mkparent(name)
	if err != nil {
		return err
	}
	return d.err(atomicfile.WriteParts(p, 0o600, parts...))
}

// Create writes the record name only if it does not exist: of several writers
// (processes included) exactly one succeeds, the others get an error matching
// fs.ErrExist.
func (d *Dir) Create(name string, data []byte) error {
	p, err := d.mkparent(name)
	if err != nil {
		return err
	}
	return d.err(atomicfile.Create(p, data, 0o600))
}

func (d *Dir) mkparent(name string) (string, error) {
	p, err := d.path(name)
	if err != nil {
		return "", errors.New(d.prefix + ": bad record name")
	}
	return p, nil
}

// Mkdir creates folder dir (0700) and its parents if missing. Write and Create do not
// create folders: a record in a missing folder matches fs.ErrNotExist.
func (d *Dir) Mkdir(dir string) error {
	p, err := d.path(dir)
	if err != nil {
		return errors.New(d.prefix + ": bad record name")
	}
	if err := os.MkdirAll(p, 0o700); err != nil {
		return d.ioErr
	}
	return nil
}

// Read returns the record name.
func (d *Dir) Read(name string) ([]byte, error) {
	p, err := d.path(name)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	return b, d.err(err)
}

// ReadHead returns up to n bytes from the start of the record name, its size and its
// modification time, without reading the rest.
func (d *Dir) ReadHead(name string, n int) (head []byte, size int64, mod time.Time, err error) {
	p, err := d.path(name)
	if err != nil {
		return nil, 0, time.Time{}, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, 0, time.Time{}, d.err(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, 0, time.Time{}, d.err(err)
	}
	head = make([]byte, n)
	k, err := f.Read(head)
	if err != nil && k == 0 && st.Size() > 0 {
		return nil, 0, time.Time{}, d.ioErr
	}
	return head[:k], st.Size(), st.ModTime(), nil
}

// Touch sets the record's modification time to now.
func (d *Dir) Touch(name string) error {
	p, err := d.path(name)
	if err != nil {
		return err
	}
	now := time.Now()
	return d.err(os.Chtimes(p, now, now))
}

// Delete removes the record name; removing a missing record is not an error.
func (d *Dir) Delete(name string) error {
	p, err := d.path(name)
	if err != nil {
		return nil
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return d.ioErr
	}
	return nil
}

// Exists reports whether the record name exists.
func (d *Dir) Exists(name string) bool {
	p, err := d.path(name)
	if err != nil {
		return false
	}
	_, err = os.Stat(p)
	return err == nil
}

// List returns, in name order (os.ReadDir's), the names of the entries of folder dir ("" for the root) that
// keep accepts. A missing folder matches fs.ErrNotExist.
func (d *Dir) List(dir string, keep func(fs.DirEntry) bool) ([]string, error) {
	p := d.root
	if dir != "" {
		var err error
		if p, err = d.path(dir); err != nil {
			return nil, err
		}
	}
	entries, err := os.ReadDir(p)
	if err != nil {
		return nil, d.err(err)
	}
	var names []string
	for _, e := range entries {
		if keep(e) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}
