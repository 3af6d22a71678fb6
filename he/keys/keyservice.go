package keys

import (
	"context"
	"errors"
	"net/http"

	"github.com/veilrpc/veil/he"

	"connectrpc.com/connect"
	hev1 "github.com/veilrpc/veil/gen/veil/he/v1"
	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
)

// IdentityFunc returns the caller's identity (its SPIFFE ID) from a request context.
// The rpc layer supplies it, so that this package does not depend on rpc or transport.
type IdentityFunc func(ctx context.Context) (string, error)

// ChunkSize is the largest chunk an upload carries (1 MiB, as the proto enforces).
const ChunkSize = 1 << 20

// MaxKeyServiceMessageSize bounds every KeyService message (a chunk plus its framing,
// or a header): the read limit the rpc layer sets for the service, whatever the size
// of the key sets uploaded through it.
const MaxKeyServiceMessageSize = ChunkSize + 1024

// NewKeyServiceHandler serves veil.he.v1.KeyService over reg: GetKeyManifest answers
// from manifests (full procedure name to manifest), uploads land in reg owned by the
// identity that identity extracts. With manifests, an upload must declare the encoded
// size of one of them or of their union (invalid_argument otherwise): a client cannot
// make the server hold keys it never asked for. Messages are at most ChunkSize plus a few bytes,
// so the service works under a small per-message read limit (about 1.1 MiB).
func NewKeyServiceHandler(reg *Registry, identity IdentityFunc, manifests map[string]*he.Manifest, opts ...connect.HandlerOption) (string, http.Handler) {
	ks := &keyService{reg: reg, identity: identity, manifests: manifests}
	var union *he.Manifest
	for _, m := range manifests {
		if ks.sizes == nil {
			ks.sizes = map[int64]bool{}
		}
		ks.sizes[he.EncodedSize(m)] = true
		if union == nil {
			union = m
		} else if u, err := union.Union(m); err == nil {
			union = u
		}
	}
	if union != nil {
		ks.sizes[he.EncodedSize(union)] = true
	}
	return hev1connect.NewKeyServiceHandler(ks, opts...)
}

type keyService struct {
	reg       *Registry
	identity  IdentityFunc
	manifests map[string]*he.Manifest
	sizes     map[int64]bool // encoded sizes of the manifests' key sets; nil: any
}

func (s *keyService) caller(ctx context.Context) (string, error) {
	if s.identity == nil {
		return "", permissionf("no identity source")
	}
	id, err := s.identity(ctx)
	if err != nil || id == "" {
		return "", newErr(connect.CodeUnauthenticated, "no caller identity")
	}
	return id, nil
}

func (s *keyService) GetKeyManifest(_ context.Context, req *connect.Request[hev1.GetKeyManifestRequest]) (*connect.Response[hev1.GetKeyManifestResponse], error) {
	m, ok := s.manifests[req.Msg.GetProcedure()]
	if !ok {
		return nil, ConnectError(newErr(connect.CodeNotFound, "no key manifest for procedure %q", req.Msg.GetProcedure()))
	}
	return connect.NewResponse(&hev1.GetKeyManifestResponse{Manifest: he.MarshalManifest(m)}), nil
}

func (s *keyService) GetUploadStatus(ctx context.Context, req *connect.Request[hev1.GetUploadStatusRequest]) (*connect.Response[hev1.GetUploadStatusResponse], error) {
	owner, err := s.caller(ctx)
	if err != nil {
		return nil, ConnectError(err)
	}
	id := req.Msg.GetKeyId()
	if !validKeyID(id) {
		return nil, ConnectError(invalidf("malformed key ID"))
	}
	received, total, complete, err := s.reg.status(owner, he.KeyID(id))
	if err != nil {
		return nil, ConnectError(err)
	}
	return connect.NewResponse(&hev1.GetUploadStatusResponse{KeyId: id, Received: uint64(received), TotalSize: uint64(total), Complete: complete}), nil
}

func (s *keyService) UploadEvaluationKeys(ctx context.Context, stream *connect.ClientStream[hev1.UploadEvaluationKeysRequest]) (res *connect.Response[hev1.UploadEvaluationKeysResponse], err error) {
	defer func() {
		if r := recover(); r != nil {
			res, err = nil, ConnectError(internalf("upload failed"))
		}
	}()
	owner, err := s.caller(ctx)
	if err != nil {
		return nil, ConnectError(err)
	}
	if !stream.Receive() {
		if err := stream.Err(); err != nil {
			return nil, err
		}
		return nil, ConnectError(invalidf("upload: empty stream"))
	}
	h := stream.Msg().GetHeader()
	if h == nil {
		return nil, ConnectError(invalidf("upload: the first message must be a header"))
	}
	if !validKeyID(h.GetKeyId()) || h.GetTotalSize() == 0 || h.GetOffset() > h.GetTotalSize() || h.GetTotalSize() > 1<<33 {
		return nil, ConnectError(invalidf("upload: malformed header"))
	}
	id := he.KeyID(h.GetKeyId())
	if s.sizes != nil && !s.sizes[int64(h.GetTotalSize())] {
		return nil, ConnectError(invalidf("upload: %d bytes is not the size of the key set of any procedure's manifest", h.GetTotalSize()))
	}
	u, gen, err := s.reg.beginUpload(owner, id, he.ParamID(h.GetParamId()), int64(h.GetTotalSize()), int64(h.GetOffset()))
	if err != nil {
		return nil, ConnectError(err)
	}
	if u.complete {
		return connect.NewResponse(&hev1.UploadEvaluationKeysResponse{KeyId: string(id), Received: uint64(u.total), Complete: true}), nil
	}
	received := int64(h.GetOffset())
	for stream.Receive() {
		chunk := stream.Msg().GetChunk()
		if len(chunk) == 0 || len(chunk) > ChunkSize {
			s.reg.abandonUpload(u, gen)
			return nil, ConnectError(invalidf("upload: chunk of %d bytes out of range [1, %d]", len(chunk), ChunkSize))
		}
		if received, err = s.reg.appendChunk(u, gen, chunk); err != nil {
			if CodeOf(err) == connect.CodeInvalidArgument {
				s.reg.abandonUpload(u, gen)
			}
			return nil, ConnectError(err)
		}
	}
	if err := stream.Err(); err != nil {
		// A broken stream keeps what arrived: the client resumes from GetUploadStatus.
		var ce *connect.Error
		if errors.As(err, &ce) {
			return nil, ce
		}
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("he: upload interrupted"))
	}
	if received < u.total {
		return connect.NewResponse(&hev1.UploadEvaluationKeysResponse{KeyId: string(id), Received: uint64(received)}), nil
	}
	if err := s.reg.finishUpload(u, gen); err != nil {
		return nil, ConnectError(err)
	}
	return connect.NewResponse(&hev1.UploadEvaluationKeysResponse{KeyId: string(id), Received: uint64(received), Complete: true}), nil
}
