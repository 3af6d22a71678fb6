package analytics

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/veilrpc/veil/internal/atomicfile"
)

// Store keeps studies and submissions outside the process, so that a restarted
// service keeps them and, with a shared store, so that every replica sees the studies
// and submissions received by any of them. DirStore is the embedded store (a
// directory); natsstate.Studies keeps them in NATS JetStream.
//
// Records are opaque bytes (the service's own protobuf encodings). Methods report a
// missing record with an error matching fs.ErrNotExist and a taken study ID with one
// matching fs.ErrExist; any other error means the store is unreachable or failing,
// which the service reports as unavailable.
type Store interface {
	// CreateStudy stores a new study's record, unless a study with that ID exists.
	CreateStudy(ctx context.Context, id string, record []byte) error
	// Study returns a study's record.
	Study(ctx context.Context, id string) ([]byte, error)
	// Studies lists the IDs of the stored studies.
	Studies(ctx context.Context) ([]string, error)
	// AddSubmission stores record as the study's submission name unless one is stored
	// under that name; added reports which. It is atomic for every process that shares
	// the store: of two concurrent calls with one name, exactly one adds. It returns
	// once the record is durable.
	AddSubmission(ctx context.Context, study, name string, record []byte) (added bool, err error)
	// Submissions lists the names of a study's stored submissions.
	Submissions(ctx context.Context, study string) ([]string, error)
	// Submission returns one stored submission.
	Submission(ctx context.Context, study, name string) ([]byte, error)
}

// DirStore is a Store in a local directory: a folder per study holding study.pb and
// one sub-NAME.pb file per submission, each written 0600 and atomically, and created
// exclusively (a hard link that fails when the name exists).
type DirStore struct{ dir string }

// NewDirStore returns a store in dir, creating it (0700) if missing.
func NewDirStore(dir string) (*DirStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("analytics: store: %w", err)
	}
	return &DirStore{dir: dir}, nil
}

var _ Store = (*DirStore)(nil)

const (
	studyFile = "study.pb"
	subPrefix = "sub-"
	subSuffix = ".pb"
)

var (
	studyIDPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	namePattern    = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

func (d *DirStore) studyDir(id string) (string, error) {
	if !studyIDPattern.MatchString(id) {
		return "", fs.ErrNotExist
	}
	return filepath.Join(d.dir, id), nil
}

// CreateStudy implements Store.
func (d *DirStore) CreateStudy(_ context.Context, id string, record []byte) error {
	dir, err := d.studyDir(id)
	if err != nil {
		return errors.New("analytics: store: bad study ID")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return errors.New("analytics: store: i/o error")
	}
	return storeErr(atomicfile.Create(filepath.Join(dir, studyFile), record, 0o600))
}

// Study implements Store.
func (d *DirStore) Study(_ context.Context, id string) ([]byte, error) {
	dir, err := d.studyDir(id)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(dir, studyFile))
	return b, storeErr(err)
}

// Studies implements Store. A folder whose study record was never completed is not a
// study.
func (d *DirStore) Studies(context.Context) ([]string, error) {
	entries, err := os.ReadDir(d.dir)
	if err != nil {
		return nil, storeErr(err)
	}
	var ids []string
	for _, e := range entries {
		if !e.IsDir() || !studyIDPattern.MatchString(e.Name()) {
			continue
		}
		if _, err := os.Stat(filepath.Join(d.dir, e.Name(), studyFile)); err == nil {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// AddSubmission implements Store.
func (d *DirStore) AddSubmission(_ context.Context, study, name string, record []byte) (bool, error) {
	dir, err := d.studyDir(study)
	if err != nil || !namePattern.MatchString(name) {
		return false, errors.New("analytics: store: bad submission name")
	}
	err = atomicfile.Create(filepath.Join(dir, subPrefix+name+subSuffix), record, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return false, nil
	}
	return err == nil, storeErr(err)
}

// Submissions implements Store.
func (d *DirStore) Submissions(_ context.Context, study string) ([]string, error) {
	dir, err := d.studyDir(study)
	if err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, storeErr(err)
	}
	var names []string
	for _, e := range entries {
		n := e.Name()
		if strings.HasPrefix(n, subPrefix) && strings.HasSuffix(n, subSuffix) {
			names = append(names, strings.TrimSuffix(strings.TrimPrefix(n, subPrefix), subSuffix))
		}
	}
	sort.Strings(names)
	return names, nil
}

// Submission implements Store.
func (d *DirStore) Submission(_ context.Context, study, name string) ([]byte, error) {
	dir, err := d.studyDir(study)
	if err != nil || !namePattern.MatchString(name) {
		return nil, fs.ErrNotExist
	}
	b, err := os.ReadFile(filepath.Join(dir, subPrefix+name+subSuffix))
	return b, storeErr(err)
}

// storeErr keeps fs.ErrNotExist and fs.ErrExist recognisable and drops paths from
// other errors.
func storeErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return fs.ErrNotExist
	case errors.Is(err, fs.ErrExist):
		return fs.ErrExist
	default:
		return errors.New("analytics: store: i/o error")
	}
}
