package analytics

import (
	"context"
	"errors"
	"io/fs"
	"path"
	"regexp"
	"sort"
	"strings"

	"github.com/veilrpc/veil/internal/dirstore"
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
type DirStore struct{ dir *dirstore.Dir }

// NewDirStore returns a store in dir, creating it (0700) if missing.
func NewDirStore(dir string) (*DirStore, error) {
	d, err := dirstore.Open(dir, "analytics: store")
	if err != nil {
		return nil, err
	}
	return &DirStore{dir: d}, nil
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

// CreateStudy implements Store.
func (d *DirStore) CreateStudy(_ context.Context, id string, record []byte) error {
	if !studyIDPattern.MatchString(id) {
		return errors.New("analytics: store: bad study ID")
	}
	if err := d.dir.Mkdir(id); err != nil {
		return err
	}
	return d.dir.Create(path.Join(id, studyFile), record)
}

// Study implements Store.
func (d *DirStore) Study(_ context.Context, id string) ([]byte, error) {
	if !studyIDPattern.MatchString(id) {
		return nil, fs.ErrNotExist
	}
	return d.dir.Read(path.Join(id, studyFile))
}

// Studies implements Store. A folder whose study record was never completed is not a
// study.
func (d *DirStore) Studies(context.Context) ([]string, error) {
	return d.dir.List("", func(e fs.DirEntry) bool {
		return e.IsDir() && studyIDPattern.MatchString(e.Name()) && d.dir.Exists(path.Join(e.Name(), studyFile))
	})
}

// AddSubmission implements Store.
func (d *DirStore) AddSubmission(_ context.Context, study, name string, record []byte) (bool, error) {
	if !studyIDPattern.MatchString(study) || !namePattern.MatchString(name) {
		return false, errors.New("analytics: store: bad submission name")
	}
	err := d.dir.Create(path.Join(study, subPrefix+name+subSuffix), record)
	if errors.Is(err, fs.ErrExist) {
		return false, nil
	}
	return err == nil, err
}

// Submissions implements Store.
func (d *DirStore) Submissions(_ context.Context, study string) ([]string, error) {
	if !studyIDPattern.MatchString(study) {
		return nil, fs.ErrNotExist
	}
	files, err := d.dir.List(study, func(e fs.DirEntry) bool {
		return strings.HasPrefix(e.Name(), subPrefix) && strings.HasSuffix(e.Name(), subSuffix)
	})
	if err != nil {
		return nil, err
	}
	names := make([]string, len(files))
	for i, n := range files {
		names[i] = strings.TrimSuffix(strings.TrimPrefix(n, subPrefix), subSuffix)
	}
	sort.Strings(names)
	return names, nil
}

// Submission implements Store.
func (d *DirStore) Submission(_ context.Context, study, name string) ([]byte, error) {
	if !studyIDPattern.MatchString(study) || !namePattern.MatchString(name) {
		return nil, fs.ErrNotExist
	}
	return d.dir.Read(path.Join(study, subPrefix+name+subSuffix))
}
