// Package average is the service of the "Build your own encrypted service" guide
// (docs/guide.md): it averages vectors encrypted with CKKS under the caller's key,
// without being able to read them, and says whom it computed for.
package average

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	examplev1 "github.com/veilrpc/veil/gen/veil/example/v1"
	"github.com/veilrpc/veil/gen/veil/example/v1/examplev1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/rpc"
)

// Service implements examplev1connect.AverageServiceHandler.
type Service struct {
	params *he.Parameters
	eval   *he.Evaluator
}

var _ examplev1connect.AverageServiceHandler = (*Service)(nil)

// New returns the service for vectors encrypted with params. Averaging needs no
// evaluation keys: additions and one multiplication by a constant.
func New(params *he.Parameters) (*Service, error) {
	eval, err := he.NewEvaluator(params, nil)
	if err != nil {
		return nil, err
	}
	return &Service{params: params, eval: eval}, nil
}

// Average returns the encrypted element-wise mean of the request's vectors.
func (s *Service) Average(ctx context.Context, req *connect.Request[examplev1.AverageRequest]) (*connect.Response[examplev1.AverageResponse], error) {
	peer, ok := rpc.PeerFromContext(ctx)
	if !ok {
		return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("average: no verified caller"))
	}
	vectors := make([]*he.Vector, len(req.Msg.GetVectors()))
	for i, m := range req.Msg.GetVectors() {
		v, err := he.UnmarshalVector(s.params, m) // validated: parameters, sizes, coefficients
		if err != nil {
			return nil, keys.ConnectError(err) // invalid_argument or failed_precondition, with he's text
		}
		vectors[i] = v
	}
	mean, err := s.eval.ElementwiseMean(ctx, vectors...)
	if err != nil {
		return nil, keys.ConnectError(err)
	}
	out, err := he.MarshalVector(mean)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&examplev1.AverageResponse{Mean: out, ComputedFor: peer.ID.String()}), nil
}

// Average is the client side: it encrypts each vector under key, has the server
// average them, and decrypts the result.
func Average(ctx context.Context, client examplev1connect.AverageServiceClient, key *he.Client, vectors ...[]float64) (mean []float64, computedFor string, err error) {
	req := &examplev1.AverageRequest{}
	for _, values := range vectors {
		v, err := key.Encrypt(values)
		if err != nil {
			return nil, "", err
		}
		m, err := he.MarshalVector(v)
		if err != nil {
			return nil, "", err
		}
		req.Vectors = append(req.Vectors, m)
	}
	res, err := client.Average(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, "", err
	}
	v, err := he.UnmarshalVector(key.Params(), res.Msg.GetMean())
	if err != nil {
		return nil, "", err
	}
	mean, err = key.Decrypt(v)
	return mean, res.Msg.GetComputedFor(), err
}

// ReadLimit is the largest request Average accepts: 16 fresh vectors of one
// ciphertext each (rpc.WithReadLimit raises the 4 MiB default to it).
func ReadLimit(params *he.Parameters) int64 {
	return 16*he.MaxVectorWireSize(params, params.Slots()) + 64<<10
}
