package main

import (
	"fmt"
	"io"
	"strings"
	"sync"
)

// progressBar draws a one-line progress bar on a terminal-like writer (stderr). It
// draws nothing when w is nil, so JSON output stays clean.
type progressBar struct {
	mu    sync.Mutex
	w     io.Writer
	label string
	last  int
}

func newProgressBar(w io.Writer, label string) *progressBar {
	return &progressBar{w: w, label: label, last: -1}
}

// set shows done of total, redrawing only when the percentage changes.
func (p *progressBar) set(done, total int64) {
	if p == nil || p.w == nil || total <= 0 {
		return
	}
	pct := int(100 * done / total)
	p.mu.Lock()
	defer p.mu.Unlock()
	if pct == p.last {
		return
	}
	p.last = pct
	const width = 30
	fill := width * pct / 100
	fmt.Fprintf(p.w, "\r  %-22s [%s%s] %3d%% %s / %s", p.label, strings.Repeat("=", fill), strings.Repeat(" ", width-fill), pct, fmtBytes(done), fmtBytes(total))
	if pct >= 100 {
		fmt.Fprintln(p.w)
	}
}
