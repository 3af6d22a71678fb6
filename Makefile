# Veil's build. Everything here works on a fresh machine with Go and a running Docker engine:
# tools are pinned in go.mod (protoc plugins), tools/go.mod (buf) and tools/lint/go.mod
# (golangci-lint), and fetched through the Go module proxy on first use.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
GO ?= go
BUF := $(GO) tool -modfile=tools/go.mod buf
GOLANGCI := $(GO) tool -modfile=tools/lint/go.mod golangci-lint
PROTOVALIDATE_VERSION := v1.2.2
FUZZTIME ?= 10s
PKGS := ./...

.PHONY: all build generate check-generate check-standalone check-layers check-breaking lint test unit integration bench fuzz demo clean spire deploy-check

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/veil ./cmd/veil

# validate.proto is copied out of the module cache (the schema module that matches the
# protovalidate runtime) into a git-ignored folder: it is never committed.
third_party/protovalidate/buf/validate/validate.proto:
	@pv=$$($(GO) mod download -json github.com/bufbuild/protovalidate@$(PROTOVALIDATE_VERSION) | sed -n 's/.*"Dir": "\(.*\)",/\1/p'); \
	mkdir -p third_party/protovalidate/buf/validate; \
	install -m0644 "$$pv/proto/protovalidate/buf/validate/validate.proto" third_party/protovalidate/buf/validate/

generate: third_party/protovalidate/buf/validate/validate.proto
	$(BUF) generate

check-generate: generate
	@git add -N gen >/dev/null 2>&1 || true
	@git diff --exit-code --stat -- gen || { echo "check-generate: gen/ is stale: run 'make generate' and commit" >&2; exit 1; }

# check-standalone proves the repository needs nothing beside it (.ci/check-standalone):
# no file names the old out-of-tree reference folders or climbs out of the repository in a Go string or a Markdown
# link, and the packages whose tests read files pass in a fresh clone of HEAD in an empty
# temporary folder. STANDALONE_CLONE=0 runs only the quick source checks.
check-standalone:
	.ci/check-standalone

# lint: vet, golangci-lint (.golangci.yml; its depguard rules encode the layering of
# docs/conventions.md and name the rule a change breaks), the layers' transitive imports
# (check-layers), buf lint and buf breaking (check-breaking).
lint: third_party/protovalidate/buf/validate/validate.proto check-layers
	$(GO) vet ./...
	$(BUF) lint
	.ci/check-breaking
	$(GOLANGCI) run ./...

# check-breaking: buf breaking against the previous commit's protos (HEAD~1, or
# BUF_BREAKING_AGAINST=REF); an intended break carries a 'Proto-Breaking: <why>'
# commit trailer (.ci/check-breaking, docs/compatibility.md).
check-breaking: third_party/protovalidate/buf/validate/validate.proto
	.ci/check-breaking

# check-layers: depguard sees direct imports; this checks that no layer reaches another
# layer, rpc, services, natsstate or cmd through any chain of imports (gen/ and internal/
# packages are allowed, and what they import is checked too), and that he (the root
# package, crypto only) reaches no Connect code (connect-go, a generated *connect
# package, he/keys).
check-layers:
	@for l in transport pqkex he; do \
	  bad=$$($(GO) list -deps ./$$l/... | grep '^github.com/veilrpc/veil/' | grep -vE "^github.com/veilrpc/veil/($$l|gen|internal)(/|$$)" || true); \
	  if [ -n "$$bad" ]; then echo "check-layers: layer $$l imports, directly or not:" $$bad >&2; exit 1; fi; \
	done; \
	bad=$$($(GO) list -deps ./he | grep -E '^connectrpc.com/|connect$$|^github.com/veilrpc/veil/he/' || true); \
	if [ -n "$$bad" ]; then echo "check-layers: he (crypto only) imports, directly or not:" $$bad >&2; exit 1; fi; \
	echo "check-layers: transport, pqkex and he import no other layer, rpc, services, natsstate or cmd; he imports no Connect code"

# unit runs every test with -race, then the allocation tests, which the race detector
# skips (it changes allocation counts), without it.
unit:
	$(GO) test -race -count=1 -timeout 20m $(PKGS)
	$(GO) test -count=1 -run 'Allocations' ./pqkex/
	$(GO) test -race -count=1 ./pqkex/ -suite SM2MLKEM768-SM3

# spire builds the pinned spire-server and spire-agent (tools/spire/go.mod) once into a
# git-ignored cache; the SPIRE test in integration/ runs them. Several minutes cold.
SPIRE_VERSION := v1.13.3
SPIRE_DIR := .cache/spire/$(SPIRE_VERSION)
spire:
	@if [ ! -x $(SPIRE_DIR)/spire-server ] || [ ! -x $(SPIRE_DIR)/spire-agent ]; then \
	  echo "building SPIRE $(SPIRE_VERSION) into $(SPIRE_DIR)"; \
	  mkdir -p $(SPIRE_DIR) && cd tools/spire && \
	  $(GO) build -o ../../$(SPIRE_DIR)/ github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent; \
	fi

# nats builds the pinned nats-server (tools/nats/go.mod) once, static, into a git-ignored
# cache; the NATS JetStream tests in integration/ run it in containers FROM scratch.
# About two and a half minutes cold on 2 cores.
NATS_VERSION := v2.15.2
NATS_DIR := .cache/nats/$(NATS_VERSION)
nats:
	@if [ ! -x $(NATS_DIR)/nats-server ]; then \
	  echo "building nats-server $(NATS_VERSION) into $(NATS_DIR)"; \
	  mkdir -p $(NATS_DIR) && cd tools/nats && \
	  CGO_ENABLED=0 $(GO) build -trimpath -o ../../$(NATS_DIR)/ github.com/nats-io/nats-server/v2; \
	fi

integration: spire nats
	cd integration && $(GO) test -count=1 -timeout 20m -v ./...

# test is what CI runs: unit tests with -race, the Helm chart check, then the container suite.
test: unit deploy-check integration

# deploy-check renders deploy/helm/veil with helm v3.22.0 (pinned in tools/deploy/go.mod,
# built by go tool on first use: a few minutes cold) for every identity mode, with the NATS
# state backend on and off (tools/deploy/deploycheck/scenarios.go); runs helm lint --strict;
# decodes every object strictly into the k8s.io/api types (custom resources into
# tools/deploy's structs; unknown fields and kinds are errors); checks the secure defaults
# and wiring; runs the checker's own tests (negative cases included, and rendered pods run
# in Docker: CA, veil-ca, cert-manager, state on the nats-server from `make nats`); and
# runs every rendered serve.yaml through DEPLOY_SERVE_CHECK (FILE appended; empty: skipped).
HELM := $(GO) tool -modfile=$(CURDIR)/tools/deploy/go.mod helm
DEPLOY_OUT := .cache/deploy-check
DEPLOY_SERVE_CHECK ?= $(DEPLOY_OUT)/veil serve --check --config
deploy-check: nats
	rm -rf $(DEPLOY_OUT) && mkdir -p $(DEPLOY_OUT)
	cd tools/deploy && $(GO) run ./cmd/deploycheck -chart ../../deploy/helm/veil -out ../../$(DEPLOY_OUT) -helm "$(HELM)"
	cd tools/deploy && $(GO) test -count=1 ./...
	@if [ -z "$(DEPLOY_SERVE_CHECK)" ]; then echo "deploy-check: DEPLOY_SERVE_CHECK is empty: serve.yaml files not checked"; exit 0; fi; \
	CGO_ENABLED=0 $(GO) build -o $(DEPLOY_OUT)/veil ./cmd/veil; \
	for f in $(DEPLOY_OUT)/*/*.serve.yaml; do printf '%s: ' "$$f"; $(DEPLOY_SERVE_CHECK) "$$f"; done

# bench runs every side-by-side suite (about three minutes on 2 cores) and writes
# bench/results/latest.json and BENCHMARKS.md; longer runs: BENCH_FLAGS="--reps 9 --stream-mib 256".
# The rpc suite's grpc_nginx peer needs nginx: found on PATH (or /usr/sbin), else installed
# from Debian's nginx-light package where apt-get works; without it the system is skipped
# with the reason printed.
BENCH_FLAGS ?=
bench:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || \
	  { command -v apt-get >/dev/null 2>&1 && { apt-get install -y nginx-light >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y nginx-light >/dev/null 2>&1; }; } && echo "make bench: installed nginx-light"; } || \
	  echo "make bench: nginx not found and 'apt-get install -y nginx-light' failed: bench rpc will skip grpc_nginx"
	cd bench && $(GO) run . all --out results/latest.json --report ../BENCHMARKS.md $(BENCH_FLAGS)

# fuzz runs every Fuzz target in the main module for FUZZTIME each. New inputs are not
# minimized (-fuzzminimizetime 0): on 2 cores minimization can outlast a short FUZZTIME;
# a crasher is still written to testdata/fuzz.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  dir=$$($(GO) list -f '{{.Dir}}' $$pkg); \
	  for f in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go 2>/dev/null | sed 's/^func //'); do \
	    echo "fuzz: $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 0 $$pkg; \
	  done; \
	done

demo:
	$(GO) run ./cmd/veil demo

clean:
	rm -rf bin third_party
