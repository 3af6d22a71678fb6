// Package refusals holds docs/refusals.md, the table of every refusal reason Veil
// emits, to the reason constants of transport, rpc and pqkex: each of those packages
// has a TestRefusalReasons that calls Check. It is for tests only.
package refusals

import (
	"bufio"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// Check fails t unless the rows of docs/refusals.md for layer list exactly the values
// of the constants declared in the non-test files of the package in the current
// directory that match: declared with type typeName, or (typeName "") untyped with a
// name starting with prefix.
func Check(t testing.TB, layer, typeName, prefix string) {
	t.Helper()
	code, err := constants(".", typeName, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(code) == 0 {
		t.Fatalf("no reason constants (type %q, prefix %q) in this package", typeName, prefix)
	}
	docs, err := table(layer)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range code {
		if !slices.Contains(docs, r) {
			t.Errorf("reason %q (layer %s) is missing from docs/refusals.md", r, layer)
		}
	}
	for _, r := range docs {
		if !slices.Contains(code, r) {
			t.Errorf("docs/refusals.md lists %q for %s, which the code does not declare", r, layer)
		}
	}
}

// constants returns the string values of the matching constants of the package in dir.
func constants(dir, typeName, prefix string) ([]string, error) {
	fset := token.NewFileSet()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		return nil, err
	}
	var out []string
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			return nil, err
		}
		for _, d := range f.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.CONST {
				continue
			}
			for _, s := range g.Specs {
				v := s.(*ast.ValueSpec)
				typ := ""
				if id, ok := v.Type.(*ast.Ident); ok {
					typ = id.Name
				}
				for i, n := range v.Names {
					if typ != typeName || typeName == "" && !strings.HasPrefix(n.Name, prefix) || i >= len(v.Values) {
						continue
					}
					lit, ok := v.Values[i].(*ast.BasicLit)
					if !ok || lit.Kind != token.STRING {
						continue
					}
					s, err := strconv.Unquote(lit.Value)
					if err != nil {
						return nil, err
					}
					out = append(out, s)
				}
			}
		}
	}
	return out, nil
}

// table returns the reasons docs/refusals.md lists for layer: the rows
// "| layer | `reason` | ... |".
func table(layer string) ([]string, error) {
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	f, err := os.Open(filepath.Join(root, "docs", "refusals.md"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		cells := strings.Split(sc.Text(), "|")
		if len(cells) < 4 || strings.TrimSpace(cells[1]) != layer {
			continue
		}
		out = append(out, strings.Trim(strings.TrimSpace(cells[2]), "`"))
	}
	return out, sc.Err()
}

// repoRoot is the nearest folder above the current directory with a go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", os.ErrNotExist
		}
		dir = parent
	}
}
