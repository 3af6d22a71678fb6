package natsstate

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"regexp"
	"sort"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

// Studies keeps analytics studies and submissions (it satisfies analytics.Store).
// Records, which may exceed a NATS message (a study carries a CKKS public key), are
// objects in the PREFIX-analytics Object Store bucket, named by study, submission and
// content hash. What makes a record count is its marker in the PREFIX-analytics KV
// bucket, written with Create, which succeeds for exactly one writer per key across
// all replicas: study.ID for a study, sub.ID.NAME for a submission (NAME is the
// service's hash of owner and idempotency key). The record is stored before its
// marker, so a marker always points at a complete record; a record whose marker lost
// the race (or was never written, when the process died in between) is never counted.
type Studies struct {
	s  *State
	os jetstream.ObjectStore
	kv jetstream.KeyValue
}

// Studies opens (creating if needed) the analytics buckets.
func (s *State) Studies(ctx context.Context) (*Studies, error) {
	b, err := s.objectStore(ctx, "analytics", "Veil: analytics study and submission records")
	if err != nil {
		return nil, err
	}
	kv, err := s.keyValue(ctx, jetstream.KeyValueConfig{Bucket: "analytics", Description: "Veil: analytics markers (atomic create = counted once)", History: 1})
	if err != nil {
		return nil, err
	}
	return &Studies{s: s, os: b, kv: kv}, nil
}

var (
	studyIDPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)
	subNamePattern = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// create stores record as an object, then the marker key pointing at it. added is false
// when the marker existed: the object just stored is removed again.
func (st *Studies) create(ctx context.Context, marker, object string, record []byte) (added bool, err error) {
	ctx, cancel := st.s.ctx(ctx)
	defer cancel()
	sum := sha256.Sum256(record)
	name := object + "/" + hex.EncodeToString(sum[:16])
	if _, err := st.os.PutBytes(ctx, name, record); err != nil {
		return false, st.s.logged("store "+name, err)
	}
	_, err = st.kv.Create(ctx, marker, []byte(name))
	if errors.Is(err, jetstream.ErrKeyExists) {
		if cur, gerr := st.kv.Get(ctx, marker); gerr == nil && string(cur.Value()) != name {
			_ = st.os.Delete(ctx, name)
		}
		return false, nil
	}
	if err != nil {
		return false, st.s.logged("create "+marker, err)
	}
	return true, nil
}

// read follows a marker to its record.
func (st *Studies) read(ctx context.Context, marker string) ([]byte, error) {
	ctx, cancel := st.s.ctx(ctx)
	defer cancel()
	e, err := st.kv.Get(ctx, marker)
	if err != nil {
		return nil, st.s.logged("read "+marker, storeErr(err))
	}
	b, err := st.os.GetBytes(ctx, string(e.Value()))
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		err = fmt.Errorf("natsstate: marker %s points at a missing record", marker)
	}
	return b, st.s.logged("read "+marker, err)
}

// keys lists the marker keys under prefix (a KV subject filter ending in ".>").
func (st *Studies) keys(ctx context.Context, prefix string) ([]string, error) {
	ctx, cancel := st.s.ctx(ctx)
	defer cancel()
	l, err := st.kv.ListKeysFiltered(ctx, prefix+">")
	if err != nil {
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil, nil
		}
		return nil, st.s.logged("list "+prefix, err)
	}
	var out []string
	for k := range l.Keys() {
		out = append(out, strings.TrimPrefix(k, prefix))
	}
	sort.Strings(out)
	return out, nil
}

// CreateStudy implements analytics.Store.
func (st *Studies) CreateStudy(ctx context.Context, id string, record []byte) error {
	if !studyIDPattern.MatchString(id) {
		return errors.New("natsstate: bad study ID")
	}
	added, err := st.create(ctx, "study."+id, "study/"+id, record)
	if err != nil {
		return err
	}
	if !added {
		return fs.ErrExist
	}
	return nil
}

// Study implements analytics.Store.
func (st *Studies) Study(ctx context.Context, id string) ([]byte, error) {
	if !studyIDPattern.MatchString(id) {
		return nil, fs.ErrNotExist
	}
	return st.read(ctx, "study."+id)
}

// Studies implements analytics.Store.
func (st *Studies) Studies(ctx context.Context) ([]string, error) {
	ids, err := st.keys(ctx, "study.")
	if err != nil {
		return nil, err
	}
	out := ids[:0]
	for _, id := range ids {
		if studyIDPattern.MatchString(id) {
			out = append(out, id)
		}
	}
	return out, nil
}

// AddSubmission implements analytics.Store.
func (st *Studies) AddSubmission(ctx context.Context, study, name string, record []byte) (bool, error) {
	if !studyIDPattern.MatchString(study) || !subNamePattern.MatchString(name) {
		return false, errors.New("natsstate: bad submission name")
	}
	return st.create(ctx, "sub."+study+"."+name, "sub/"+study+"/"+name, record)
}

// Submissions implements analytics.Store.
func (st *Studies) Submissions(ctx context.Context, study string) ([]string, error) {
	if !studyIDPattern.MatchString(study) {
		return nil, fs.ErrNotExist
	}
	names, err := st.keys(ctx, "sub."+study+".")
	if err != nil {
		return nil, err
	}
	out := names[:0]
	for _, n := range names {
		if subNamePattern.MatchString(n) {
			out = append(out, n)
		}
	}
	return out, nil
}

// Submission implements analytics.Store.
func (st *Studies) Submission(ctx context.Context, study, name string) ([]byte, error) {
	if !studyIDPattern.MatchString(study) || !subNamePattern.MatchString(name) {
		return nil, fs.ErrNotExist
	}
	return st.read(ctx, "sub."+study+"."+name)
}
