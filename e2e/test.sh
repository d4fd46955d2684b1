#!/usr/bin/env bash
# Runs all of tern's tests: formatting, lints, unit tests, and the tests that
# start real etcd and kube-apiserver processes. Builds the pinned test
# binaries first (e2e/build-tools.sh; skipped when they are up to date).
#
# Usage: e2e/test.sh [extra cargo test arguments]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "test.sh: $1 is required: $2" >&2; exit 1; }
}
need cargo "install Rust (rustup) 1.89 or newer"
need go "install Go 1.26 or newer (it builds the pinned etcd and kube-apiserver)"

e2e/install-deps.sh

start=$SECONDS
step() { echo; echo "== $* ($((SECONDS - start)) s)"; }

step "building pinned test binaries"
e2e/build-tools.sh

step "formatting"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The router without trace export is what `tern bench` compares against.
cargo clippy -p tern-router --no-default-features --locked -- -D warnings
# The agent as it ships, without the failpoints the tests switch on.
cargo clippy -p tern-agent --locked -- -D warnings
if command -v shellcheck >/dev/null 2>&1; then
  shellcheck e2e/*.sh .ci/run
else
  echo "test.sh: shellcheck not installed; scripts not linted"
fi

step "tests"
# Two test threads on a two-core machine: each control-plane test starts
# etcd and kube-apiserver processes of its own.
cargo test --workspace --locked "$@" -- --test-threads=2

step "done"
