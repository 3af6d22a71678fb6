package apishape

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestOptionShape fails when an exported option of the module is not connect-go's
// shape (docs/conventions.md, "API shape"):
//   - an exported type whose name ends in "Option" is an interface whose methods are
//     all unexported (at least one, directly or through interfaces of its package it
//     embeds), so that only its package can make one and an option can only fill a
//     config, never be called on the object being built;
//   - an exported function named With... or Without..., or returning an exported
//     ...Option type, returns no function type;
//   - no exported function or method takes a variadic list of an exported function
//     type (an option list by another name, such as he.Need before it became an
//     interface).
//
// It parses every non-test, non-generated .go file of the main module (not bench/,
// integration/ or tools/, which are modules of their own).
func TestOptionShape(t *testing.T) {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(root, "go.mod")); err != nil || !strings.HasPrefix(string(b), "module github.com/veilrpc/veil\n") {
		t.Fatalf("module root %s: go.mod not the veil module (%v)", root, err)
	}
	pkgs, err := parseModule(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(pkgs) < 10 {
		t.Fatalf("parsed only %d packages under %s: the walk is broken", len(pkgs), root)
	}
	var options int
	for _, dir := range sortedKeys(pkgs) {
		n, problems := check(pkgs[dir])
		options += n
		rel, _ := filepath.Rel(root, dir)
		for _, p := range problems {
			t.Errorf("%s: %s", rel, p)
		}
	}
	if options < 20 {
		t.Errorf("found only %d exported option types: the check is not seeing them", options)
	}
}

// TestOptionShapeCheck runs the checker on small packages, with and without
// violations, so that TestOptionShape cannot pass by checking nothing.
func TestOptionShapeCheck(t *testing.T) {
	for _, tc := range []struct {
		name, src string
		problems  int
	}{
		{"interface with unexported method", `
			type Option interface{ apply(*config) }
			type option func(*config)
			func (f option) apply(c *config) { f(c) }
			func WithX(x int) Option { return option(func(c *config) { c.x = x }) }`, 0},
		{"both sides, embedded", `
			type ServerOption interface{ applyToServer(*config) }
			type ClientOption interface{ applyToClient(*config) }
			type Option interface {
				ServerOption
				ClientOption
			}`, 0},
		{"function type", `
			type Option func(*config)
			func WithX(x int) Option { return func(c *config) { c.x = x } }`, 2},
		{"function type mutating the object", `
			type UploaderOption func(*Uploader)`, 1},
		{"exported method", `
			type Option interface{ Apply(*Config) }`, 1},
		{"exported and unexported methods", `
			type Option interface {
				apply(*config)
				String() string
			}`, 1},
		{"empty interface", `
			type Option interface{}`, 1},
		{"embeds another package's interface", `
			type Option interface{ connect.ClientOption }`, 1},
		{"struct", `
			type Option struct{ X int }`, 1},
		{"constructor returning a func literal type", `
			func WithX(x int) func(*Config) { return nil }`, 1},
		{"constructor returning an unexported func type", `
			type opt func(*Config)
			func WithoutX() opt { return nil }`, 1},
		{"variadic exported func type", `
			type Need func(*Manifest)
			func NewManifest(needs ...Need) *Manifest { return nil }`, 1},
		{"unexported option types are free", `
			type option func(*config)
			func newThing(opts ...option) {}`, 0},
		{"Options struct is not an option", `
			type TrainOptions struct{ Epochs int }
			func Train(o TrainOptions) {}`, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := parser.ParseFile(token.NewFileSet(), "x.go", "package x\n"+tc.src, parser.SkipObjectResolution)
			if err != nil {
				t.Fatal(err)
			}
			_, problems := check([]*ast.File{f})
			if len(problems) != tc.problems {
				t.Errorf("%d problems, want %d: %q", len(problems), tc.problems, problems)
			}
		})
	}
}

// parseModule returns the non-test, non-generated files of each package directory
// under root, skipping nested modules, testdata and hidden directories.
func parseModule(root string) (map[string][]*ast.File, error) {
	fset := token.NewFileSet()
	pkgs := map[string][]*ast.File{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			name := d.Name()
			if path != root && (name == "testdata" || strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_")) {
				return filepath.SkipDir
			}
			if path != root {
				if _, err := os.Stat(filepath.Join(path, "go.mod")); err == nil {
					return filepath.SkipDir // a module of its own
				}
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ParseComments|parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		if ast.IsGenerated(f) {
			return nil
		}
		pkgs[filepath.Dir(path)] = append(pkgs[filepath.Dir(path)], f)
		return nil
	})
	return pkgs, err
}

// check returns the number of exported option types of one package's files and its
// violations of the rules of TestOptionShape.
func check(files []*ast.File) (options int, problems []string) {
	types := map[string]*ast.TypeSpec{}
	for _, f := range files {
		for _, decl := range f.Decls {
			if g, ok := decl.(*ast.GenDecl); ok && g.Tok == token.TYPE {
				for _, s := range g.Specs {
					ts := s.(*ast.TypeSpec)
					types[ts.Name.Name] = ts
				}
			}
		}
	}
	isFunc := func(e ast.Expr) bool {
		switch e := ast.Unparen(e).(type) {
		case *ast.FuncType:
			return true
		case *ast.Ident:
			ts, ok := types[e.Name]
			if !ok {
				return false
			}
			_, fn := ast.Unparen(ts.Type).(*ast.FuncType)
			return fn
		}
		return false
	}
	for _, name := range sortedKeys(types) {
		ts := types[name]
		if !ast.IsExported(name) || !strings.HasSuffix(name, "Option") {
			continue
		}
		options++
		if why := optionInterface(ts, types, map[string]bool{}); why != "" {
			problems = append(problems, fmt.Sprintf("option type %s %s: it must be an interface with unexported methods only, as in connect-go", name, why))
		}
	}
	for _, f := range files {
		for _, decl := range f.Decls {
			fn, ok := decl.(*ast.FuncDecl)
			if !ok || !ast.IsExported(fn.Name.Name) {
				continue
			}
			name := fn.Name.Name
			if fn.Recv != nil && len(fn.Recv.List) == 1 {
				name = recvName(fn.Recv.List[0].Type) + "." + name
			}
			constructor := strings.HasPrefix(fn.Name.Name, "With")
			if fn.Type.Results != nil {
				for _, r := range fn.Type.Results.List {
					if id, ok := ast.Unparen(r.Type).(*ast.Ident); ok && ast.IsExported(id.Name) && strings.HasSuffix(id.Name, "Option") {
						constructor = true
					}
				}
				for _, r := range fn.Type.Results.List {
					if constructor && isFunc(r.Type) {
						problems = append(problems, fmt.Sprintf("option constructor %s returns a function type: return an option interface", name))
					}
				}
			}
			if ps := fn.Type.Params.List; len(ps) > 0 {
				if v, ok := ps[len(ps)-1].Type.(*ast.Ellipsis); ok {
					if id, ok := ast.Unparen(v.Elt).(*ast.Ident); ok && ast.IsExported(id.Name) && isFunc(id) {
						problems = append(problems, fmt.Sprintf("%s takes ...%s, a function type: an option list must be of an interface with an unexported method", name, id.Name))
					}
				}
			}
		}
	}
	return options, problems
}

// optionInterface returns why ts is not an interface whose methods, its own and
// those of the interfaces of its package it embeds, are all unexported (and at least
// one); "" if it is.
func optionInterface(ts *ast.TypeSpec, types map[string]*ast.TypeSpec, seen map[string]bool) string {
	if seen[ts.Name.Name] {
		return "embeds itself"
	}
	seen[ts.Name.Name] = true
	it, ok := ast.Unparen(ts.Type).(*ast.InterfaceType)
	if !ok {
		return fmt.Sprintf("is a %s", kind(ts.Type))
	}
	methods := 0
	for _, m := range it.Methods.List {
		if len(m.Names) > 0 {
			for _, n := range m.Names {
				if ast.IsExported(n.Name) {
					return fmt.Sprintf("has the exported method %s", n.Name)
				}
				methods++
			}
			continue
		}
		id, ok := ast.Unparen(m.Type).(*ast.Ident)
		if !ok {
			return fmt.Sprintf("embeds %s, which this check cannot see into", exprString(m.Type))
		}
		inner, ok := types[id.Name]
		if !ok {
			return fmt.Sprintf("embeds %s, which this check cannot see into", id.Name)
		}
		if why := optionInterface(inner, types, seen); why != "" {
			return fmt.Sprintf("embeds %s, which %s", id.Name, why)
		}
		methods++
	}
	if methods == 0 {
		return "has no method"
	}
	return ""
}

func kind(e ast.Expr) string {
	switch ast.Unparen(e).(type) {
	case *ast.FuncType:
		return "function type"
	case *ast.StructType:
		return "struct"
	case *ast.InterfaceType:
		return "interface"
	}
	return "type " + exprString(e)
}

func exprString(e ast.Expr) string {
	switch e := ast.Unparen(e).(type) {
	case *ast.Ident:
		return e.Name
	case *ast.SelectorExpr:
		return exprString(e.X) + "." + e.Sel.Name
	case *ast.StarExpr:
		return "*" + exprString(e.X)
	}
	return fmt.Sprintf("%T", e)
}

func recvName(e ast.Expr) string {
	switch e := ast.Unparen(e).(type) {
	case *ast.StarExpr:
		return recvName(e.X)
	case *ast.IndexExpr:
		return recvName(e.X)
	case *ast.IndexListExpr:
		return recvName(e.X)
	}
	return exprString(e)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
