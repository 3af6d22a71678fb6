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
	for _, key := range keys {
		node := doc[key]
		if key == "policy" {
			if rules, err = decodePolicy(&node); err != nil {
				return nil, fmt.Errorf("%w: config %s: policy: %v", errUsage, path, err)
			}
			continue
		}
		f := fs.Lookup(key)
		if f == nil || key == "config" {
			return nil, fmt.Errorf("%w: config %s: unknown key %q (known: %s)", errUsage, path, key, knownKeys(fs))
		}
		if explicit[key] {
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
			if err := fs.Set(key, v); err != nil {
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
		if f.Name != "config" {
			names = append(names, f.Name)
		}
	})
	return strings.Join(append(names, "policy"), ", ")
}
