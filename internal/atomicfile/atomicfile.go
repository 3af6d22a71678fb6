// Package atomicfile writes files so that readers see either the old content or the
// new content, never a half-written file: it writes a temporary file in the same
// directory, syncs it, and renames it over the target.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
)

// Write replaces path with data, created with mode perm (0600 for anything secret).
func Write(path string, data []byte, perm os.FileMode) error {
	return write(path, perm, os.Rename, data)
}

// WriteParts is Write of the concatenation of parts, without building it in memory
// (a header and a large body, say).
func WriteParts(path string, perm os.FileMode, parts ...[]byte) error {
	return write(path, perm, os.Rename, parts...)
}

// Create writes data to path like Write, but only if path does not exist: the
// temporary file is hard-linked into place, which fails atomically when the name is
// taken. It returns an error matching fs.ErrExist then, so that of several writers
// (processes included) exactly one creates the file.
func Create(path string, data []byte, perm os.FileMode) error {
	return write(path, perm, os.Link, data)
}

func write(path string, perm os.FileMode, place func(oldpath, newpath string) error, parts ...[]byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	name := tmp.Name()
	defer func() {
		_ = tmp.Close()
		_ = os.Remove(name) // after a rename, nothing is left to remove; after a link, the temporary name
	}()
	if err := tmp.Chmod(perm); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	for _, p := range parts {
		if _, err := tmp.Write(p); err != nil {
			return fmt.Errorf("atomicfile: %w", err)
		}
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	if err := place(name, path); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}
