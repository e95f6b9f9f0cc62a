// Command kind-config-check reads a kind cluster config and decodes it the way the
// pinned kind release does (see go.mod): apiVersion and kind first, then a strict
// decode into kind's v1alpha4.Cluster with the YAML decoder kind uses (unknown fields
// are errors), then kind's public v1alpha4 defaulting. On success it prints the
// defaulted config as JSON; otherwise it prints one line per problem, each starting
// with the path of the field (nodes[1].labels), and exits 1.
//
// kind's semantic validation (roles, subnets, ports) lives in an internal package of
// kind and is not applied here.
//
// Usage: kind-config-check FILE
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"

	yaml "go.yaml.in/yaml/v3"
	"sigs.k8s.io/kind/pkg/apis/config/v1alpha4"
)

const (
	apiVersion = "kind.x-k8s.io/v1alpha4"
	kind       = "Cluster"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: kind-config-check FILE")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	cluster, problems := decode(raw)
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintf(os.Stderr, "%s: %s\n", os.Args[1], p)
		}
		os.Exit(1)
	}
	out, err := json.MarshalIndent(cluster, "", "  ")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println(string(out))
}

// decode returns the defaulted config, or the problems that kind would refuse it for.
func decode(raw []byte) (*v1alpha4.Cluster, []string) {
	var meta struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
	}
	if err := yaml.Unmarshal(raw, &meta); err != nil {
		return nil, []string{"not a YAML mapping with apiVersion and kind: " + err.Error()}
	}
	if meta.APIVersion != apiVersion {
		return nil, []string{fmt.Sprintf("apiVersion: %q is not %q", meta.APIVersion, apiVersion)}
	}
	if meta.Kind != kind {
		return nil, []string{fmt.Sprintf("kind: %q is not %q", meta.Kind, kind)}
	}

	cluster := &v1alpha4.Cluster{}
	strict := yaml.NewDecoder(bytes.NewReader(raw))
	strict.KnownFields(true)
	err := strict.Decode(cluster)
	var typeErr *yaml.TypeError
	if errors.As(err, &typeErr) {
		var doc yaml.Node
		_ = yaml.Unmarshal(raw, &doc) // it decoded above, so it parses
		paths := newPathIndex(&doc)
		problems := make([]string, 0, len(typeErr.Errors))
		for _, msg := range typeErr.Errors {
			problems = append(problems, paths.explain(msg))
		}
		return nil, problems
	}
	if err != nil {
		return nil, []string{err.Error()}
	}
	v1alpha4.SetDefaultsCluster(cluster)
	return cluster, nil
}

// A field of the document: its path, and the YAML node of its key (nil for list items)
// and of its value.
type field struct {
	path       string
	key, value *yaml.Node
}

// pathIndex finds the field a decoding error is about from the line the error names.
type pathIndex map[int][]field

func newPathIndex(doc *yaml.Node) pathIndex {
	index := pathIndex{}
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.DocumentNode:
			for _, c := range n.Content {
				walk(c, path)
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				p := k.Value
				if path != "" {
					p = path + "." + k.Value
				}
				index[k.Line] = append(index[k.Line], field{p, k, v})
				if v.Line != k.Line {
					index[v.Line] = append(index[v.Line], field{p, k, v})
				}
				walk(v, p)
			}
		case yaml.SequenceNode:
			for i, c := range n.Content {
				p := path + "[" + strconv.Itoa(i) + "]"
				index[c.Line] = append(index[c.Line], field{p, nil, c})
				walk(c, p)
			}
		}
	}
	walk(doc, "")
	return index
}

var (
	unknownField = regexp.MustCompile(`^line (\d+): field (\S+) not found in type`)
	wrongType    = regexp.MustCompile(`^line (\d+): cannot unmarshal (\S+)`)
)

// explain puts the path of the field in front of one of the YAML decoder's messages:
// for an unknown field, the key of that name on that line; for a wrong type, the first
// value on that line with the tag the message names.
func (index pathIndex) explain(msg string) string {
	if m := unknownField.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		for _, f := range index[line] {
			if f.key != nil && f.key.Line == line && f.key.Value == m[2] {
				return f.path + ": unknown field (" + msg + ")"
			}
		}
	}
	if m := wrongType.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		for _, f := range index[line] {
			if f.value.Line == line && f.value.ShortTag() == m[2] {
				return f.path + ": wrong type (" + msg + ")"
			}
		}
	}
	return msg
}
