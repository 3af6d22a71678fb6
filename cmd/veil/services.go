package main

import (
	"flag"
	"fmt"

	"github.com/veilrpc/veil/gen/veil/analytics/v1/analyticsv1connect"
	"github.com/veilrpc/veil/gen/veil/echo/v1/echov1connect"
	"github.com/veilrpc/veil/gen/veil/he/v1/hev1connect"
	"github.com/veilrpc/veil/gen/veil/scoring/v1/scoringv1connect"
	"github.com/veilrpc/veil/he"
	"github.com/veilrpc/veil/he/keys"
	"github.com/veilrpc/veil/rpc"
	"github.com/veilrpc/veil/services/analytics"
	"github.com/veilrpc/veil/services/echo"
	"github.com/veilrpc/veil/services/scoring"
)

// builtin is a service `veil serve` can run: the Connect services it mounts (for the
// policy), the server options it needs (read limits), and how to mount it.
type builtin struct {
	names    []string
	opts     []rpc.ServerOption
	register func(*rpc.Server)
}

// serviceFlags are the settings of the built-in services.
type serviceFlags struct {
	scoringModel   *string
	keysStore      *string
	keysBudget     *int64
	analyticsStore *string
}

func addServiceFlags(fs *flag.FlagSet) serviceFlags {
	return serviceFlags{
		scoringModel:   fs.String("scoring-model", "", "scoring: the model JSON file (from 'veil model train')"),
		keysStore:      fs.String("keys-store", "", "scoring: directory where uploaded evaluation keys survive restarts (default: memory only)"),
		keysBudget:     fs.Int64("keys-memory", 2<<30, "scoring: memory budget for evaluation keys in bytes (least recently used keys are evicted)"),
		analyticsStore: fs.String("analytics-store", "", "analytics: directory where studies and submissions survive restarts (default: memory only)"),
	}
}

// buildService prepares the named built-in service; validateServe has checked the
// names and the flags each one needs.
func buildService(name string, f serviceFlags, shared *sharedState) (builtin, error) {
	switch name {
	case "echo":
		return builtin{
			names: []string{echov1connect.EchoServiceName},
			register: func(s *rpc.Server) {
				rpc.Register[echov1connect.EchoServiceHandler](s, echov1connect.NewEchoServiceHandler, echo.New())
			},
		}, nil
	case "scoring":
		model, err := scoring.LoadModel(*f.scoringModel)
		if err != nil {
			return builtin{}, err
		}
		regOpts := []keys.RegistryOption{keys.WithMemoryBudget(*f.keysBudget)}
		switch {
		case shared.keys != nil:
			regOpts = append(regOpts, keys.WithKeyStore(shared.keys, 0))
		case *f.keysStore != "":
			regOpts = append(regOpts, keys.WithStore(*f.keysStore))
		}
		svc, err := scoring.New(model, scoring.WithRegistryOptions(regOpts...))
		if err != nil {
			return builtin{}, err
		}
		return builtin{
			names:    []string{scoringv1connect.ScoringServiceName, hev1connect.KeyServiceName},
			opts:     svc.ServerOptions(),
			register: svc.Register,
		}, nil
	case "analytics":
		var opts []analytics.Option
		switch {
		case shared.studies != nil:
			opts = append(opts, analytics.WithStudyStore(shared.studies, 0))
		case *f.analyticsStore != "":
			opts = append(opts, analytics.WithStore(*f.analyticsStore))
		}
		svc, err := analytics.New(opts...)
		if err != nil {
			return builtin{}, err
		}
		// Studies may use any preset: each procedure gets the largest limit it needs.
		limits := map[string]int64{}
		for _, p := range he.Presets() {
			for proc, n := range analytics.ReadLimits(p) {
				limits[proc] = max(limits[proc], n)
			}
		}
		var serverOpts []rpc.ServerOption
		for proc, n := range limits {
			if n > rpc.DefaultReadLimit {
				serverOpts = append(serverOpts, rpc.WithReadLimit(proc, n))
			}
		}
		return builtin{
			names:    []string{analyticsv1connect.AnalyticsServiceName},
			opts:     serverOpts,
			register: svc.Register,
		}, nil
	}
	return builtin{}, fmt.Errorf("%w: unknown service %q (available: echo, scoring, analytics)", errUsage, name)
}
