package transport

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
)

// WatchOption configures WatchFiles.
type WatchOption interface {
	applyToWatch(*watchConfig)
}

type watchOption func(*watchConfig)

func (f watchOption) applyToWatch(c *watchConfig) { f(c) }

type watchConfig struct {
	poll     time.Duration
	debounce time.Duration
	logger   *slog.Logger
}

// WithPollInterval re-reads the files this often even without a change notification
// (default one minute), for file systems that do not deliver them.
func WithPollInterval(d time.Duration) WatchOption {
	return watchOption(func(c *watchConfig) { c.poll = d })
}

// FileStatus counts a watched FileSource's reloads.
type FileStatus struct {
	Reloads   uint64 // new material taken into use
	Rejected  uint64 // reloads refused: unreadable, half-written or mismatched files
	LastError string // why the latest reload was refused, "" after a good one
}

// WatchFiles loads the identity in dir (tls.crt, tls.key, ca.crt, as cert-manager
// writes them) and reloads it whenever they change until ctx ends. It watches the
// directory, so it also sees Kubernetes' atomic update of a mounted Secret (a new
// timestamped directory, then the ..data symlink swapped to it). A reload that fails,
// such as a half-written file or a certificate that does not match the key, keeps the
// current identity in use; it is logged and counted in Status, and the next change or
// poll tries again.
func WatchFiles(ctx context.Context, dir string, opts ...WatchOption) (*FileSource, error) {
	cfg := watchConfig{poll: time.Minute, debounce: 50 * time.Millisecond, logger: slog.Default()}
	for _, o := range opts {
		o.applyToWatch(&cfg)
	}
	s, err := LoadFiles(dir)
	if err != nil {
		return nil, err
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("transport: watch %s: %w", dir, err)
	}
	if err := w.Add(dir); err != nil {
		_ = w.Close()
		return nil, fmt.Errorf("transport: watch %s: %w", dir, err)
	}
	s.watch = &watchState{}
	go s.watchLoop(ctx, w, cfg)
	return s, nil
}

type watchState struct {
	mu     sync.Mutex
	status FileStatus
}

// Status reports the reloads of a source made by WatchFiles.
func (s *FileSource) Status() FileStatus {
	if s.watch == nil {
		return FileStatus{}
	}
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	return s.watch.status
}

func (s *FileSource) watchLoop(ctx context.Context, w *fsnotify.Watcher, cfg watchConfig) {
	defer func() { _ = w.Close() }()
	poll := time.NewTicker(cfg.poll)
	defer poll.Stop()
	// Events come in bursts (a write, a chmod, a rename, a symlink swap): reload once
	// they have settled.
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-w.Events:
			if !ok {
				return
			}
			settle.Reset(cfg.debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return
			}
			cfg.logger.Warn("transport: file watch error", "dir", s.dir, "err", err.Error())
		case <-poll.C:
			s.reloadChanged(cfg)
		case <-settle.C:
			s.reloadChanged(cfg)
		}
	}
}

// reloadChanged reloads the directory and records the outcome; files identical to the
// current material count as neither a reload nor a rejection.
func (s *FileSource) reloadChanged(cfg watchConfig) {
	m, err := readIdentity(s.dir)
	s.watch.mu.Lock()
	defer s.watch.mu.Unlock()
	if err != nil {
		s.watch.status.Rejected++
		s.watch.status.LastError = err.Error()
		cfg.logger.Warn("transport: identity files not reloaded; the current identity stays in use", "dir", s.dir, "err", err.Error())
		return
	}
	s.watch.status.LastError = ""
	cur := s.cur.Load()
	if cur.SVID.Certificates[0].Equal(m.SVID.Certificates[0]) && sameRoots(cur, m) {
		return
	}
	s.cur.Store(m)
	s.watch.status.Reloads++
	cfg.logger.Info("transport: identity reloaded", "dir", s.dir, "id", m.SVID.ID.String(),
		"serial", m.SVID.Certificates[0].SerialNumber.Text(16), "expires", m.SVID.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
}

func sameRoots(a, b *StaticSource) bool {
	ab, err1 := a.Bundles.GetX509BundleForTrustDomain(a.SVID.ID.TrustDomain())
	bb, err2 := b.Bundles.GetX509BundleForTrustDomain(b.SVID.ID.TrustDomain())
	return err1 == nil && err2 == nil && ab.Equal(bb)
}
