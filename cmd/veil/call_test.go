package main

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestFindMethod(t *testing.T) {
	for _, procedure := range []string{
		"veil.echo.v1.EchoService/Echo",  // grpcurl, buf curl
		"/veil.echo.v1.EchoService/Echo", // the HTTP path
		"veil.echo.v1.EchoService.Echo",  // grpcurl's dotted form
	} {
		m, path, err := findMethod(procedure)
		if err != nil || path != "/veil.echo.v1.EchoService/Echo" || m.FullName() != "veil.echo.v1.EchoService.Echo" {
			t.Errorf("findMethod(%q) = %v, %q, %v", procedure, m, path, err)
		}
	}
	if _, path, err := findMethod("veil.echo.v1.EchoService/EchoStream"); err != nil || path != "/veil.echo.v1.EchoService/EchoStream" {
		t.Errorf("EchoStream: %q, %v", path, err)
	}

	known := callableProcedures()
	for _, want := range []string{"veil.echo.v1.EchoService/Echo", "veil.echo.v1.EchoService/EchoStream"} {
		if !slices.Contains(known, want) {
			t.Errorf("callable procedures %q lack %s", known, want)
		}
	}
	// veil call sends one request message: client-streaming procedures are not listed.
	if slices.Contains(known, "veil.echo.v1.EchoService/EchoBidi") {
		t.Errorf("callable procedures list the bidi stream EchoBidi")
	}
	for _, p := range known {
		if !strings.HasPrefix(p, "veil.") {
			t.Errorf("callable procedures list %s, not a Veil service", p)
		}
	}
	if !slices.IsSorted(known) {
		t.Errorf("callable procedures not sorted: %q", known)
	}

	for _, tc := range []struct {
		procedure string
		lists     bool // well formed but not compiled in: the error lists what is
	}{
		{"veil.echo.v1.EchoService/Nope", true},
		{"/veil.echo.v1.Nope/Echo", true},
		{"veil.echo.v1.EchoRequest/Echo", true}, // a message, not a service
		{"nope.v1.Service/Method", true},
		{"Echo", false},
		{"/", false},
		{"veil.echo.v1.EchoService/", false},
		{"veil.echo.v1.EchoService/Echo/extra", false},
		{"", false},
	} {
		_, _, err := findMethod(tc.procedure)
		if !errors.Is(err, errUsage) {
			t.Errorf("findMethod(%q): %v, want a usage error", tc.procedure, err)
			continue
		}
		if lists := strings.Contains(err.Error(), "\n  veil.echo.v1.EchoService/Echo\n"); lists != tc.lists {
			t.Errorf("findMethod(%q): %q; lists the procedures: %v, want %v", tc.procedure, err, lists, tc.lists)
		}
	}
}
