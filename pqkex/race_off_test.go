//go:build !race

package pqkex

const raceEnabled = false
