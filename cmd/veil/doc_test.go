package main

import (
	"go/parser"
	gotoken "go/token"
	"strings"
	"testing"
)

// TestPackageCommentListsEveryCommand: the command list in main.go's package comment
// (what go doc shows) names every command the CLI runs, and no other.
func TestPackageCommentListsEveryCommand(t *testing.T) {
	f, err := parser.ParseFile(gotoken.NewFileSet(), "main.go", nil, parser.ParseComments|parser.PackageClauseOnly)
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	for _, line := range strings.Split(f.Doc.Text(), "\n") {
		if fields := strings.Fields(line); len(fields) > 1 && fields[0] == "veil" {
			listed[fields[1]] = true
		}
	}
	for _, c := range commands() {
		if !listed[c.name] {
			t.Errorf("command %q is missing from main.go's package comment", c.name)
		}
		delete(listed, c.name)
	}
	for name := range listed {
		t.Errorf("main.go's package comment lists %q, which is not a command", name)
	}
}
