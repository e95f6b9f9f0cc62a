#!/usr/bin/env bash
# Installs the Debian packages the tests and the local cluster need, if missing.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v sysctl >/dev/null 2>&1 || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing Debian packages: ${need[*]}: install them (sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo ">> installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
