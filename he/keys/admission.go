package keys

import (
	"errors"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Admission bounds the homomorphic work a server takes on, before it reads a request:
// the calls running at once (in all, and per identity) and the memory they hold
// (request bodies, decoded ciphertexts, results), each call being charged a cost the
// service computes from what the request may carry at most. A call that does not fit
// is refused with resource_exhausted, a Retry-After header and a
// google.rpc.RetryInfo detail, without its body being read. Admission never waits:
// queueing is the client's, with its own deadline. The evaluation buffers are the
// WorkerPool's, a fixed amount apart from this budget.
type Admission struct {
	identity IdentityFunc
	budget   int64
	maxCalls int
	perID    int
	retry    time.Duration

	mu      sync.Mutex
	used    int64
	peak    int64
	calls   int
	byID    map[string]int
	refused int64
}

// AdmissionOption configures NewAdmission.
type AdmissionOption interface{ applyAdmission(*admissionConfig) }

type admissionConfig struct {
	budget   int64
	maxCalls int
	perID    int
	retry    time.Duration
}

type admissionOptionFunc func(*admissionConfig)

func (f admissionOptionFunc) applyAdmission(c *admissionConfig) { f(c) }

// WithAdmissionBudget bounds the bytes admitted calls may hold together (default
// 1 GiB).
func WithAdmissionBudget(bytes int64) AdmissionOption {
	return admissionOptionFunc(func(c *admissionConfig) { c.budget = bytes })
}

// WithMaxCalls bounds the calls admitted at once (default 2 x GOMAXPROCS) and those of
// one identity (default 2).
func WithMaxCalls(total, perIdentity int) AdmissionOption {
	return admissionOptionFunc(func(c *admissionConfig) { c.maxCalls, c.perID = total, perIdentity })
}

// WithRetryAfter sets the retry hint of a refusal (default 1 second).
func WithRetryAfter(d time.Duration) AdmissionOption {
	return admissionOptionFunc(func(c *admissionConfig) { c.retry = d })
}

// NewAdmission returns an admission controller; identity names the caller of a
// request (the same function the KeyService uses).
func NewAdmission(identity IdentityFunc, opts ...AdmissionOption) (*Admission, error) {
	cfg := admissionConfig{budget: 1 << 30, maxCalls: 2 * runtime.GOMAXPROCS(0), perID: 2, retry: time.Second}
	for _, o := range opts {
		o.applyAdmission(&cfg)
	}
	if identity == nil || cfg.budget <= 0 || cfg.maxCalls < 1 || cfg.perID < 1 || cfg.retry <= 0 {
		return nil, invalidf("admission: need an identity function and positive limits")
	}
	return &Admission{identity: identity, budget: cfg.budget, maxCalls: cfg.maxCalls, perID: cfg.perID, retry: cfg.retry, byID: map[string]int{}}, nil
}

// AdmissionStats is a snapshot of an Admission.
type AdmissionStats struct {
	Budget, Used, Peak int64 // bytes
	Calls              int   // admitted and running
	Refused            int64 // since creation
}

// Stats returns the current occupancy, the peak of Used since creation and the
// number of refusals.
func (a *Admission) Stats() AdmissionStats {
	a.mu.Lock()
	defer a.mu.Unlock()
	return AdmissionStats{Budget: a.budget, Used: a.used, Peak: a.peak, Calls: a.calls, Refused: a.refused}
}

// Admit charges one call of cost bytes to owner, or refuses it with
// resource_exhausted. The caller must call release exactly once when the call ends.
func (a *Admission) Admit(owner string, cost int64) (release func(), err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case cost > a.budget:
		// Never admissible: the limits are configured too small for this call.
		a.refused++
		return nil, exhaustedf("a call needing %d bytes exceeds the server's admission budget of %d", cost, a.budget)
	case a.byID[owner] >= a.perID:
		a.refused++
		return nil, exhaustedf("%d calls of this identity already running: retry later", a.byID[owner])
	case a.calls >= a.maxCalls || a.used+cost > a.budget:
		a.refused++
		return nil, exhaustedf("server busy: retry later")
	}
	a.calls++
	a.byID[owner]++
	a.used += cost
	a.peak = max(a.peak, a.used)
	var once sync.Once
	return func() {
		once.Do(func() {
			a.mu.Lock()
			defer a.mu.Unlock()
			a.calls--
			if a.byID[owner]--; a.byID[owner] == 0 {
				delete(a.byID, owner)
			}
			a.used -= cost
		})
	}, nil
}

// RetryError converts a refusal into the Connect error a handler returns: err's code
// (CodeOf) and text, a google.rpc.RetryInfo detail and a Retry-After header (whole
// seconds, at least 1) saying to retry after d.
func RetryError(err error, d time.Duration) *connect.Error {
	code, msg := CodeOf(err), err.Error()
	var in *connect.Error
	if errors.As(err, &in) {
		code, msg = in.Code(), in.Message()
	}
	ce := connect.NewError(code, errors.New(msg))
	if det, derr := connect.NewErrorDetail(&errdetails.RetryInfo{RetryDelay: durationpb.New(d)}); derr == nil {
		ce.AddDetail(det)
	}
	ce.Meta().Set("Retry-After", strconv.Itoa(max(1, int((d+time.Second-1)/time.Second))))
	return ce
}

// RetryAfter returns the retry hint of a refusal: the RetryInfo detail's delay, else
// the Retry-After header's, and false when err carries neither.
func RetryAfter(err error) (time.Duration, bool) {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return 0, false
	}
	for _, d := range ce.Details() {
		if v, derr := d.Value(); derr == nil {
			if ri, ok := v.(*errdetails.RetryInfo); ok && ri.GetRetryDelay() != nil {
				return ri.GetRetryDelay().AsDuration(), true
			}
		}
	}
	if s, err := strconv.Atoi(ce.Meta().Get("Retry-After")); err == nil && s > 0 {
		return time.Duration(s) * time.Second, true
	}
	return 0, false
}

// Handler admits each request to next before next reads its body: cost returns the
// most the request may hold (from its procedure, declared sizes or Content-Length and
// the read limit). A refusal is written in the request's protocol (Connect, gRPC or
// gRPC-Web) by connect's ErrorWriter; next never runs. Requests cost reports 0 for
// pass straight through.
func (a *Admission) Handler(cost func(r *http.Request) int64, next http.Handler) http.Handler {
	ew := connect.NewErrorWriter()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := cost(r)
		if n <= 0 {
			next.ServeHTTP(w, r)
			return
		}
		owner, err := a.identity(r.Context())
		if err != nil || owner == "" {
			_ = ew.Write(w, r, connect.NewError(connect.CodeUnauthenticated, errors.New("he: no caller identity")))
			return
		}
		release, err := a.Admit(owner, n)
		if err != nil {
			_ = ew.Write(w, r, RetryError(err, a.retry))
			return
		}
		defer release()
		next.ServeHTTP(w, r)
	})
}
