#!/usr/bin/env bash
# Runs all of tern's tests: formatting, lints, unit tests, and the tests that
# start real etcd and kube-apiserver processes. Builds the pinned test
# binaries first (e2e/build-tools.sh; skipped when they are up to date).
#
# The node e2e (e2e/tests/nodes.rs: three clusters with a real node each,
# the multi-cluster scenarios on real pods) runs when this runs as root on
# Linux; TERN_NODE_E2E=0 leaves it out, TERN_NODE_E2E=1 insists on it.
#
# Usage: e2e/test.sh [extra cargo test arguments]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

node_e2e=${TERN_NODE_E2E:-auto}
if [ "$node_e2e" = auto ]; then
  if [ "$(id -u)" = 0 ] && [ "$(uname -s)" = Linux ]; then node_e2e=1; else node_e2e=0; fi
fi
export TERN_NODE_E2E=$node_e2e

# What a node e2e killed before its clean-up leaves (containers, their
# shims): every process in a tern-node cgroup. Also run on exit.
sweep_nodes() {
  local d
  for d in /sys/fs/cgroup/pids/tern-node-*; do
    [ -d "$d" ] || continue
    find "$d" -name cgroup.procs -print0 | xargs -0 cat 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
}
go_cache=""
go_pid=""
go_log=""
late_pid=""
late_dir=""
listing=""
on_exit() {
  # A Go build still running (this run failed or ended early): its whole
  # session.
  local pid
  for pid in $go_pid $late_pid; do
    kill -- -"$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$go_cache" ]; then rm -rf "$go_cache"; fi
  if [ -n "$go_log" ]; then rm -f "$go_log"; fi
  if [ -n "$late_dir" ]; then rm -rf "$late_dir"; fi
  if [ -n "$listing" ]; then rm -f "$listing"; fi
  if [ "$node_e2e" = 1 ]; then sweep_nodes; fi
}
trap on_exit EXIT

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "test.sh: $1 is required: $2" >&2; exit 1; }
}
need cargo "install Rust (rustup) 1.89 or newer"
need go "install Go 1.26 or newer (it builds the pinned etcd and kube-apiserver)"
need setsid "install util-linux (the pinned Go builds run in their own session)"
need ionice "install util-linux (the late Go build runs at idle disk priority)"

if [ "$node_e2e" = 1 ]; then e2e/install-deps.sh --node; else e2e/install-deps.sh; fi

# Incremental compilation state is a third of a debug target (gigabytes)
# and grows with every commit a warm CI checkout builds; a test run builds
# each crate once, so it gains nothing from it.
export CARGO_INCREMENTAL=0

start=$SECONDS
step() { echo; echo "== $* ($((SECONDS - start)) s)"; }

step "building pinned test binaries, in the background while Rust compiles"
# On a cold checkout the Go builds take about 25 minutes of the machine and
# the Rust builds about 15; each leaves a core idle part of the time
# (links, the last crates), so they run side by side. Two chains:
# - the control plane's (etcd, toxiproxy, kube-apiserver, kubectl), which
#   every test starting servers needs: the tests wait for it;
# - the late one (Jaeger, and for the node e2e kubelet & co, containerd,
#   runc, the CNI plugins), which only the binaries run last need
#   (run-tests.sh waits for it before them). It runs at the lowest CPU
#   and disk priority, on what the Rust builds and then the tests leave
#   idle: most tests wait on timers and links far more than they compute.
# One Go build cache serves both (the node's Kubernetes binaries reuse the
# control plane's packages: the late chain builds them only once the
# control plane's are done) and is removed once both are: it is gigabytes,
# and useless once the binaries exist. setsid: on failure the exit trap
# stops the whole build, go's compilers included.
go_cache=$(mktemp -d "${TMPDIR:-/tmp}/tern-go-build.XXXXXX")
go_log=$(mktemp "${TMPDIR:-/tmp}/tern-go-build-log.XXXXXX")
# The late chain's output, its exit status once it ends (run-tests.sh
# reads both), and the control plane chain's "done" mark.
late_dir=$(mktemp -d "${TMPDIR:-/tmp}/tern-go-late.XXXXXX")
export TERN_LATE_BUILD=$late_dir
# shellcheck disable=SC2016 # the script is expanded by the inner bash
TERN_GO_CACHE=$go_cache setsid bash -c '
  set -e
  e2e/build-tools.sh etcd toxiproxy kubernetes
  touch "$1/control-plane-built"
' build-tools "$late_dir" >"$go_log" 2>&1 &
go_pid=$!
# shellcheck disable=SC2016 # the script is expanded by the inner bash
TERN_GO_CACHE=$go_cache setsid nice -n 19 ionice -c 3 bash -c '
  (
    set -e
    e2e/build-tools.sh jaeger
    if [ "$2" = 1 ]; then e2e/build-tools.sh containerd runc cni pause; fi
    while [ ! -e "$1/control-plane-built" ]; do sleep 2; done
    if [ "$2" = 1 ]; then e2e/build-tools.sh kubernetes-node; fi
    rm -rf "$TERN_GO_CACHE"
  )
  echo "$?" >"$1/status.tmp"
  mv "$1/status.tmp" "$1/status"
' late-build "$late_dir" "$node_e2e" >"$late_dir/log" 2>&1 &
late_pid=$!

step "formatting"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The router without trace export (what `tern bench` compares against)
# and the agent as it ships, without the failpoints the tests switch on:
# one command, so that the dependencies they get other features of than
# in the workspace are checked once.
cargo clippy -p tern-router -p tern-agent --no-default-features --locked -- -D warnings
if command -v shellcheck >/dev/null 2>&1; then
  shellcheck e2e/*.sh e2e/kind/*.sh operator/deploy/images/*.sh .ci/run
else
  echo "test.sh: shellcheck not installed; scripts not linted"
fi

step "compiling the tests"
# The listing names every test binary and its package, for run-tests.sh.
listing=$(mktemp "${TMPDIR:-/tmp}/tern-test-listing.XXXXXX")
cargo test --workspace --locked --no-run --message-format=json-render-diagnostics "$@" >"$listing"
# The TLS test runs routers and agents as processes (their logs are
# scanned for secrets); the node e2e's images are made from these too.
# After the tests' build: that one builds them too (for their packages'
# own tests) with the agent's failpoints, the tests' feature, and this
# build puts the binaries without them back at target/debug/.
# --workspace: the features of their dependencies are resolved over the
# whole workspace, as for the tests below, so that tokio, kube, tonic and
# the rest are compiled once for both (built alone, the binaries got
# other features of them, and a cold run compiled ~55 crates twice). No
# test-only code comes with that: the agent's failpoints are a
# dev-dependency feature, and no dependency's test features are used.
bins="--bin tern-router --bin tern-agent"
if [ "$node_e2e" = 1 ]; then bins="$bins --bin tern-operator"; fi
# shellcheck disable=SC2086 # $bins is a list of flags
cargo build --workspace $bins --locked

step "waiting for the control plane's binaries"
go_status=0
wait "$go_pid" || go_status=$?
go_pid=""
cat "$go_log"
rm -f "$go_log"
go_log=""
if [ "$go_status" != 0 ]; then
  echo "test.sh: building the pinned test binaries failed (exit $go_status); its output is above" >&2
  exit 1
fi

step "tests"
# Two test threads per binary on a two-core machine: each control-plane
# test starts etcd and kube-apiserver processes of its own.
if [ $# -eq 0 ]; then
  # Two binaries at a time, then those that need the late chain's tools
  # or the machine alone, one at a time (run-tests.sh says why); the doc
  # tests first, through cargo.
  cargo test --workspace --locked --doc
  e2e/run-tests.sh "$listing"
else
  # Extra arguments (a package, a filter): cargo runs what they select,
  # once every binary is built.
  e2e/run-tests.sh --wait-late-build
  cargo test --workspace --locked "$@" -- --test-threads=2
fi

step "done"
