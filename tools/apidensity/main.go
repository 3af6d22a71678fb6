//go:build ignore

// apidensity counts a package's exported identifiers per 1,000 lines of non-test Go
// code. "decls" counts exported top-level types, functions, constants and variables and
// the exported methods of exported types (the figure issue 16 quotes); "+fields" adds
// the exported fields and interface methods of exported types. Run from the repository
// root: go run tools/apidensity/main.go transport pki rpc he pqkex
package main

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"
)

func main() {
	for _, dir := range os.Args[1:] {
		files, _ := filepath.Glob(filepath.Join(dir, "*.go"))
		fset := token.NewFileSet()
		lines, decls, members := 0, 0, 0
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			af, err := parser.ParseFile(fset, f, nil, parser.SkipObjectResolution)
			if err != nil {
				panic(err)
			}
			lines += fset.File(af.Pos()).LineCount()
			for _, d := range af.Decls {
				switch d := d.(type) {
				case *ast.FuncDecl:
					if !d.Name.IsExported() {
						continue
					}
					if d.Recv != nil && !recvExported(d.Recv.List[0].Type) {
						continue
					}
					decls++
				case *ast.GenDecl:
					for _, s := range d.Specs {
						switch s := s.(type) {
						case *ast.TypeSpec:
							if !s.Name.IsExported() {
								continue
							}
							decls++
							members += fieldsOf(s.Type)
						case *ast.ValueSpec:
							for _, n := range s.Names {
								if n.IsExported() {
									decls++
								}
							}
						}
					}
				}
			}
		}
		fmt.Printf("%-22s lines %5d  decls %4d (%.0f/kloc)  +fields %4d (%.0f/kloc)\n", dir, lines, decls,
			1000*float64(decls)/float64(lines), decls+members, 1000*float64(decls+members)/float64(lines))
	}
}

func recvExported(e ast.Expr) bool {
	for {
		switch t := e.(type) {
		case *ast.StarExpr:
			e = t.X
		case *ast.IndexExpr:
			e = t.X
		case *ast.IndexListExpr:
			e = t.X
		case *ast.Ident:
			return t.IsExported()
		default:
			return false
		}
	}
}

func fieldsOf(e ast.Expr) int {
	var fl *ast.FieldList
	switch t := e.(type) {
	case *ast.StructType:
		fl = t.Fields
	case *ast.InterfaceType:
		fl = t.Methods
	default:
		return 0
	}
	n := 0
	for _, f := range fl.List {
		for _, name := range f.Names {
			if name.IsExported() {
				n++
			}
		}
	}
	return n
}
