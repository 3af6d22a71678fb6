package dirstore

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRecords(t *testing.T) {
	root := filepath.Join(t.TempDir(), "store")
	d, err := Open(root, "test: store")
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(root); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("root: %v %v", st, err)
	}
	if _, err := d.Read("a"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing record: %v", err)
	}
	if err := d.Write("a", []byte("head|"), []byte("body")); err != nil {
		t.Fatal(err)
	}
	if b, err := d.Read("a"); err != nil || string(b) != "head|body" {
		t.Errorf("read %q, %v", b, err)
	}
	if st, _ := os.Stat(filepath.Join(root, "a")); st.Mode().Perm() != 0o600 {
		t.Errorf("record mode %v, want 0600", st.Mode().Perm())
	}
	if err := d.Write("a", []byte("new")); err != nil {
		t.Fatal(err)
	}
	head, size, _, err := d.ReadHead("a", 2)
	if err != nil || string(head) != "ne" || size != 3 {
		t.Errorf("head %q size %d: %v", head, size, err)
	}
	if err := d.Touch("a"); err != nil {
		t.Error(err)
	}

	// Create is exclusive; records in a missing folder are missing.
	if err := d.Create("s/x", []byte("1")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("create in a missing folder: %v", err)
	}
	if err := d.Mkdir("s"); err != nil {
		t.Fatal(err)
	}
	if err := d.Create("s/x", []byte("1")); err != nil {
		t.Fatal(err)
	}
	if err := d.Create("s/x", []byte("2")); !errors.Is(err, fs.ErrExist) {
		t.Errorf("second create: %v", err)
	}
	if b, _ := d.Read("s/x"); !bytes.Equal(b, []byte("1")) {
		t.Errorf("second create replaced the record: %q", b)
	}
	_ = d.Create("s/y", nil)
	names, err := d.List("s", func(e fs.DirEntry) bool { return !strings.HasPrefix(e.Name(), ".") })
	if err != nil || strings.Join(names, ",") != "x,y" {
		t.Errorf("list %v, %v", names, err)
	}
	if _, err := d.List("none", func(fs.DirEntry) bool { return true }); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("list of a missing folder: %v", err)
	}
	if !d.Exists("s/x") || d.Exists("s/z") {
		t.Error("Exists")
	}

	if err := d.Delete("a"); err != nil {
		t.Error(err)
	}
	if err := d.Delete("a"); err != nil {
		t.Errorf("deleting a missing record: %v", err)
	}
	if d.Exists("a") {
		t.Error("deleted record exists")
	}
}

// TestNamesStayInside: a name that is not local never reaches the file system, and
// errors never carry a path.
func TestNamesStayInside(t *testing.T) {
	parent := t.TempDir()
	d, err := Open(filepath.Join(parent, "store"), "test: store")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(parent, "outside"), []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"../outside", "/etc/passwd", "", "s/../../outside"} {
		if _, err := d.Read(name); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("read %q: %v", name, err)
		}
		if err := d.Write(name, []byte("x")); err == nil || strings.Contains(err.Error(), parent) {
			t.Errorf("write %q: %v", name, err)
		}
		if err := d.Create(name, []byte("x")); err == nil {
			t.Errorf("create %q accepted", name)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(parent, "outside")); string(b) != "secret" {
		t.Errorf("a file outside the store changed: %q", b)
	}
	// A failing write (the folder is a file) is an i/o error without the path.
	if err := d.Write("f", []byte("x")); err != nil {
		t.Fatal(err)
	}
	err = d.Write("f/g", []byte("x"))
	if err == nil || err.Error() != "test: store: i/o error" {
		t.Errorf("write under a file: %v", err)
	}
}
