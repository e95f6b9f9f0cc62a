#!/usr/bin/env bash
# Builds the real components of the local cluster from their Go modules and
# caches them under ~/.cache/ttsfleet/bin/<name>-<version>/ (keyed on versions):
#   k8s-<v>/        kube-apiserver kube-controller-manager kube-scheduler kubectl
#   etcd-<v>/       etcd
#   kwok-<v>/       kwok kwokctl
#   helm-<v>+k8s-<k8s v>/ helm
#   prometheus-<v>/ prometheus
#   kind-<v>/       kind-config-check (hack/kind/check: kind's own config types, no kind CLI)
# A second run finds every binary and builds nothing.
# Usage: hack/tools.sh [build|check]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
# shellcheck source=../operator/ttsfleet/cluster/versions.env
source "$root/operator/ttsfleet/cluster/versions.env"

cache=${TTSFLEET_CACHE:-$HOME/.cache/ttsfleet}
bin=$cache/bin
export GOMODCACHE=${GOMODCACHE:-$cache/go/mod}
export GOCACHE=${GOCACHE:-$cache/go/build}
export GOFLAGS=-modcacherw GOWORK=off CGO_ENABLED=0 GOTOOLCHAIN=local

die() { echo "error: $*" >&2; exit 1; }

check_go() {
  command -v go >/dev/null 2>&1 ||
    die "Go >= $GO_MIN_VERSION is needed to build the local cluster: install it (apt-get install golang, or a release from go.dev) and put 'go' on PATH."
  local have
  have=$(go env GOVERSION 2>/dev/null | sed 's/^go//')
  if [ "$(printf '%s\n%s\n' "$GO_MIN_VERSION" "$have" | sort -V | head -1)" != "$GO_MIN_VERSION" ]; then
    die "Go $have is too old to build the local cluster: install Go >= $GO_MIN_VERSION and put it first on PATH."
  fi
}

# have DIR BINARY...: true when every binary is already built in DIR.
have() {
  local dir=$1; shift
  for b in "$@"; do [ -x "$dir/$b" ] || return 1; done
}

# timed LABEL CMD...: runs CMD and reports how long it took.
timed() {
  local label=$1 start; shift
  start=$(date +%s)
  echo ">> building $label" >&2
  "$@"
  echo ">> built $label in $(( $(date +%s) - start ))s" >&2
}

# publish TMP DIR: a finished build replaces DIR whole, so no half-built DIR is ever seen.
publish() {
  chmod 755 "$1"
  rm -rf "$2" && mv "$1" "$2"
}

build_k8s() {
  local dir=$bin/k8s-$KUBERNETES_VERSION minor
  have "$dir" kube-apiserver kube-controller-manager kube-scheduler kubectl && return
  minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  local pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  local tmp
  tmp=$(mktemp -d "$dir.partial.XXXX")
  (cd "$here/k8s" && timed "kubernetes $KUBERNETES_VERSION" go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  publish "$tmp" "$dir"
}

build_etcd() {
  local dir=$bin/etcd-$ETCD_VERSION
  have "$dir" etcd && return
  local tmp
  tmp=$(mktemp -d "$dir.partial.XXXX")
  (cd "$here/k8s" && timed "etcd $ETCD_VERSION" go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  publish "$tmp" "$dir"
}

# install_module NAME VERSION LDFLAGS PACKAGE...: go install at a pinned version.
install_module() {
  local name=$1 version=$2 ldflags=$3; shift 3
  local dir=$bin/$name-$version bins=()
  for p in "$@"; do bins+=("$(basename "${p%@*}")"); done
  have "$dir" "${bins[@]}" && return
  local tmp
  tmp=$(mktemp -d "$dir.partial.XXXX")
  GOBIN=$tmp timed "$name $version" go install -trimpath -ldflags "$ldflags" "$@"
  publish "$tmp" "$dir"
}

# The kind config checker, built against the kind release it checks for. Keyed on that
# version; a stamp of its own sources rebuilds it when they change.
build_kind_check() {
  local dir=$bin/kind-$KIND_VERSION src=$here/kind/check sum
  grep -q "sigs.k8s.io/kind $KIND_VERSION\$" "$src/go.mod" ||
    die "hack/kind/check/go.mod must require sigs.k8s.io/kind $KIND_VERSION (versions.env)"
  sum=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -d' ' -f1)
  have "$dir" kind-config-check && [ "$(cat "$dir/source.sha256" 2>/dev/null)" = "$sum" ] && return
  local tmp
  tmp=$(mktemp -d "$dir.partial.XXXX")
  (cd "$src" && timed "kind-config-check (kind $KIND_VERSION)" go build -trimpath -ldflags "-s -w" -o "$tmp/kind-config-check" .)
  echo "$sum" >"$tmp/source.sha256"
  publish "$tmp" "$dir"
}

# fetch_crds NAME MODULE VERSION FILE...: CRD files from a Go module's source (go mod
# download: no build), copied under $bin/NAME-VERSION/ (they are not committed here).
fetch_crds() {
  local name=$1 module=$2 version=$3; shift 3
  local dir=$bin/$name-$version files=()
  for f in "$@"; do files+=("$(basename "$f")"); done
  [ -d "$dir" ] && (cd "$dir" && ls "${files[@]}" >/dev/null 2>&1) && return
  local tmp src
  tmp=$(mktemp -d "$dir.partial.XXXX")
  src=$(cd "$here/k8s" && GOFLAGS=-mod=mod go mod download -json "$module@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -n "$src" ] || die "could not download $module@$version"
  for f in "$@"; do cp "$src/$f" "$tmp/"; done
  chmod 644 "$tmp"/*
  publish "$tmp" "$dir"
  echo ">> fetched $name $version CRDs" >&2
}

build_all() {
  check_go
  mkdir -p "$bin"
  # One build at a time: a second caller waits, then finds everything built.
  exec 9>"$bin/.lock"
  flock 9
  trap 'rm -rf "$bin"/*.partial.*' EXIT
  local start
  start=$(date +%s)
  build_k8s
  build_etcd
  install_module kwok "$KWOK_VERSION" "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
  # Helm assumes the Kubernetes version it was built against (lint, template, --dry-run):
  # stamp ours, as Helm's own Makefile does, and key the build on it.
  local k8s_minor h=helm.sh/helm/v3
  k8s_minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  install_module helm "$HELM_VERSION+k8s-$KUBERNETES_VERSION" \
    "-s -w -X $h/internal/version.version=$HELM_VERSION -X $h/pkg/chartutil.k8sVersionMajor=1 -X $h/pkg/chartutil.k8sVersionMinor=$k8s_minor -X $h/pkg/lint/rules.k8sVersionMajor=1 -X $h/pkg/lint/rules.k8sVersionMinor=$k8s_minor" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  # Prometheus v3.X.Y is published as Go module version v0.3XX.Y.
  local promver
  promver=$(echo "$PROMETHEUS_VERSION" | sed -E 's/^v0\.3([0-9]{2})\.([0-9]+)$/3.\1.\2/; s/^3\.0/3./')
  install_module prometheus "$PROMETHEUS_VERSION" "-s -w -X github.com/prometheus/common/version.Version=$promver" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
  build_kind_check
  fetch_crds gateway-api-crds sigs.k8s.io/gateway-api "$GATEWAY_API_VERSION" \
    config/crd/standard/gateway.networking.k8s.io_httproutes.yaml \
    config/crd/standard/gateway.networking.k8s.io_gateways.yaml
  fetch_crds external-dns-crds sigs.k8s.io/external-dns "$EXTERNAL_DNS_VERSION" \
    config/crd/standard/dnsendpoints.externaldns.k8s.io.yaml
  echo "tools ready under $bin ($(( $(date +%s) - start ))s)"
}

case "${1:-build}" in
  build) build_all ;;
  check) check_go ;;
  *) die "usage: hack/tools.sh [build|check]" ;;
esac
