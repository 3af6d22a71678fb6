// Package apishape holds TestOptionShape, which checks that the module's exported
// options have connect-go's shape (docs/conventions.md, "API shape"). It has no code of
// its own: the test parses the module's source.
package apishape
