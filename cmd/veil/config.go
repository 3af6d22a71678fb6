package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// A serve configuration file is YAML whose keys are serve's flag names: a scalar for
// a flag, a list for a repeatable one. One more key, policy, lists authorization rules
// per procedure. Flags given on the command line override the file. Unknown keys and
// bad values are refused at start with a message naming them:
//
//	listen: ":8443"
//	identity: /etc/veil/identity
//	pq: strict
//	pq-seal: strict
//	service: [echo]
//	policy:
//	  - procedure: /veil.echo.v1.EchoService/*
//	    allow: ["spiffe://example.org/ns/*/sa/*"]
//	state:
//	  backend: nats
//	  url: tls://nats-0.nats:4222,tls://nats-1.nats:4222,tls://nats-2.nats:4222
//	  replicas: 3
//
// The state map's keys are the --state-* flags without their prefix (backend is
// --state itself).

// policyRule is one entry of a config file's policy list.
type policyRule struct {
	Procedure string   `yaml:"procedure"`
	Allow     []string `yaml:"allow"`
}

// applyConfig reads the YAML file at path into the flags of fs that were not set on the
// command line, and returns the file's policy rules.
func applyConfig(fs *flag.FlagSet, path string) ([]policyRule, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var doc map[string]yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("%w: config %s: %v", errUsage, path, err)
	}
	explicit := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { explicit[f.Name] = true })
	keys := make([]string, 0, len(doc))
	for k := range doc {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var rules []policyRule
	type setting struct {
		key  string // as written in the file, for messages
		flag string
		node yaml.Node
	}
	var settings []setting
	for _, key := range keys {
		node := doc[key]
		switch key {
		case "policy":
			if rules, err = decodePolicy(&node); err != nil {
				return nil, fmt.Errorf("%w: config %s: policy: %v", errUsage, path, err)
			}
			continue
		case "state":
			if node.Kind != yaml.MappingNode {
				return nil, fmt.Errorf("%w: config %s: state: want a map (backend, url, replicas, ...)", errUsage, path)
			}
			for i := 0; i+1 < len(node.Content); i += 2 {
				k := node.Content[i].Value
				name := "state-" + k
				if k == "backend" {
					name = "state"
				}
				if k == "" || fs.Lookup(name) == nil {
					return nil, fmt.Errorf("%w: config %s: unknown key \"state.%s\" (known: %s)", errUsage, path, k, stateKeys(fs))
				}
				settings = append(settings, setting{"state." + k, name, *node.Content[i+1]})
			}
			continue
		}
		f := fs.Lookup(key)
		if f == nil || key == "config" || strings.HasPrefix(key, "state-") {
			return nil, fmt.Errorf("%w: config %s: unknown key %q (known: %s)", errUsage, path, key, knownKeys(fs))
		}
		settings = append(settings, setting{key, key, node})
	}
	for _, st := range settings {
		key, node := st.key, st.node
		if explicit[st.flag] {
			continue
		}
		var values []string
		switch node.Kind {
		case yaml.ScalarNode:
			values = []string{node.Value}
		case yaml.SequenceNode:
			for _, item := range node.Content {
				if item.Kind != yaml.ScalarNode {
					return nil, fmt.Errorf("%w: config %s: key %q: list items must be plain values", errUsage, path, key)
				}
				values = append(values, item.Value)
			}
		default:
			return nil, fmt.Errorf("%w: config %s: key %q: want a value or a list of values", errUsage, path, key)
		}
		for _, v := range values {
			if err := fs.Set(st.flag, v); err != nil {
				return nil, fmt.Errorf("%w: config %s: key %q: invalid value %q: %v", errUsage, path, key, v, err)
			}
		}
	}
	return rules, nil
}

func decodePolicy(node *yaml.Node) ([]policyRule, error) {
	raw, err := yaml.Marshal(node)
	if err != nil {
		return nil, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	var rules []policyRule
	if err := dec.Decode(&rules); err != nil {
		return nil, err
	}
	for i, r := range rules {
		if r.Procedure == "" || len(r.Allow) == 0 {
			return nil, fmt.Errorf("rule %d needs procedure and allow", i+1)
		}
	}
	return rules, nil
}

func knownKeys(fs *flag.FlagSet) string {
	var names []string
	fs.VisitAll(func(f *flag.Flag) {
		if f.Name != "config" && f.Name != "state" && !strings.HasPrefix(f.Name, "state-") {
			names = append(names, f.Name)
		}
	})
	return strings.Join(append(names, "policy", "state"), ", ")
}

// stateKeys lists the keys of the config file's state map.
func stateKeys(fs *flag.FlagSet) string {
	names := []string{"backend"}
	fs.VisitAll(func(f *flag.Flag) {
		if k, ok := strings.CutPrefix(f.Name, "state-"); ok {
			names = append(names, k)
		}
	})
	return strings.Join(names, ", ")
}
