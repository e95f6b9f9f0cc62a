#!/usr/bin/env bash
# in-netns.sh NAME CMD...: run CMD in a network namespace of its own, made here and
# removed after: its own loopback (127.0.0.0/8, every address), so that a benchmark can
# give each region and observer an address and cut one link with one `ip rule`
# (benchmarks/regions_bench.py). The local table is looked up after rule 10..99, where
# such cuts go. Needs root (ip netns).
set -euo pipefail
name=$1; shift
ip netns add "$name"
trap 'ip netns del "$name"' EXIT
ip netns exec "$name" ip link set lo up
ip netns exec "$name" ip rule add pref 100 lookup local
ip netns exec "$name" ip rule del pref 0
ip netns exec "$name" "$@"
