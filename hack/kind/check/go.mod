// The kind config checker (main.go): decodes a config into kind's own v1alpha4 types.
// Built by hack/tools.sh into ~/.cache/ttsfleet/bin/kind-<KIND_VERSION>/; the kind
// version here must be KIND_VERSION in operator/ttsfleet/cluster/versions.env.
module ttsfleet.dev/hack/kind/check

go 1.25.0

require (
	go.yaml.in/yaml/v3 v3.0.4
	sigs.k8s.io/kind v0.33.0
)

require github.com/pkg/errors v0.9.1 // indirect
