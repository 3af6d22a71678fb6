package keys

import (
	"context"

	"github.com/veilrpc/veil/he"

	"connectrpc.com/connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
)

// FetchManifest asks a server which evaluation keys procedure needs.
func FetchManifest(ctx context.Context, client hev1connect.KeyServiceClient, params *he.Parameters, procedure string) (*he.Manifest, error) {
	res, err := client.GetKeyManifest(ctx, connect.NewRequest(&hev1.GetKeyManifestRequest{Procedure: procedure}))
	if err != nil {
		return nil, err
	}
	return he.UnmarshalManifest(params, res.Msg.GetManifest())
}

// Uploader sends one evaluation-key set to a KeyService: once, in ChunkSize chunks,
// resuming from the server's offset after a broken connection, and again when the
// server reports the keys missing (Do).
type Uploader struct {
	client hev1connect.KeyServiceClient
	keys   *he.EvaluationKeys
	cfg    uploaderConfig
}

// UploaderOption configures NewUploader.
type UploaderOption interface{ applyUploader(*uploaderConfig) }

type uploaderConfig struct {
	progress func(sent, total int64)
	attempts int
	chunk    int
}

type uploaderOptionFunc func(*uploaderConfig)

func (f uploaderOptionFunc) applyUploader(c *uploaderConfig) { f(c) }

// WithProgress calls f after each chunk with the bytes the server holds or has been
// sent so far, and the total.
func WithProgress(f func(sent, total int64)) UploaderOption {
	return uploaderOptionFunc(func(c *uploaderConfig) { c.progress = f })
}

// WithAttempts sets how many streams one Upload may open (default 3).
func WithAttempts(n int) UploaderOption {
	return uploaderOptionFunc(func(c *uploaderConfig) { c.attempts = max(1, n) })
}

// WithChunkSize sets the chunk size (default and maximum ChunkSize).
func WithChunkSize(n int) UploaderOption {
	return uploaderOptionFunc(func(c *uploaderConfig) { c.chunk = min(max(1, n), ChunkSize) })
}

// NewUploader returns an uploader of keys to client.
func NewUploader(client hev1connect.KeyServiceClient, keys *he.EvaluationKeys, opts ...UploaderOption) *Uploader {
	cfg := uploaderConfig{attempts: 3, chunk: ChunkSize}
	for _, o := range opts {
		o.applyUploader(&cfg)
	}
	return &Uploader{client: client, keys: keys, cfg: cfg}
}

// KeyID returns the ID of the uploader's keys.
func (u *Uploader) KeyID() (he.KeyID, error) { return u.keys.ID() }

// Upload makes sure the server holds the keys. It asks for the upload status first,
// so a complete upload costs one small call and an interrupted one resumes where the
// server stopped.
func (u *Uploader) Upload(ctx context.Context) (he.KeyID, error) {
	data, err := u.keys.Encode()
	if err != nil {
		return "", err
	}
	id, _ := u.keys.ID()
	total := int64(len(data))
	var last error
	for range u.cfg.attempts {
		st, err := u.client.GetUploadStatus(ctx, connect.NewRequest(&hev1.GetUploadStatusRequest{KeyId: string(id)}))
		if err != nil {
			return id, err
		}
		if st.Msg.GetComplete() {
			return id, nil
		}
		offset := int64(st.Msg.GetReceived())
		if st.Msg.GetTotalSize() != uint64(total) {
			offset = 0
		}
		done, err := u.send(ctx, id, data, offset)
		if err == nil && done {
			return id, nil
		}
		last = err
		if ctx.Err() != nil {
			return id, ctx.Err()
		}
	}
	if last == nil {
		last = internalf("upload of %s incomplete", short(id))
	}
	return id, last
}

func (u *Uploader) send(ctx context.Context, id he.KeyID, data []byte, offset int64) (bool, error) {
	stream := u.client.UploadEvaluationKeys(ctx)
	total := int64(len(data))
	err := stream.Send(&hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Header{Header: &hev1.UploadHeader{
		KeyId: string(id), ParamId: string(u.keys.ParamID()), TotalSize: uint64(total), Offset: uint64(offset),
	}}})
	for pos := offset; err == nil && pos < total; {
		end := min(total, pos+int64(u.cfg.chunk))
		err = stream.Send(&hev1.UploadEvaluationKeysRequest{Part: &hev1.UploadEvaluationKeysRequest_Chunk{Chunk: data[pos:end]}})
		pos = end
		if err == nil && u.cfg.progress != nil {
			u.cfg.progress(pos, total)
		}
	}
	res, cerr := stream.CloseAndReceive()
	if cerr != nil {
		return false, cerr
	}
	return res.Msg.GetComplete(), nil
}

// Do runs call with the keys' ID. If the server answers that it no longer holds these
// keys (expired, evicted, restarted without a store), Do uploads them and runs call
// once more.
func (u *Uploader) Do(ctx context.Context, call func(ctx context.Context, id he.KeyID) error) error {
	id, err := u.keys.ID()
	if err != nil {
		return err
	}
	err = call(ctx, id)
	if missing, ok := IsKeysMissing(err); !ok || missing != id {
		return err
	}
	if _, err := u.Upload(ctx); err != nil {
		return err
	}
	return call(ctx, id)
}
