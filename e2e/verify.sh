#!/usr/bin/env bash
# `tern verify`: randomized runs of a recorded workload against a local
# three-region deployment under injected faults, judged by the history
# checkers. Installs what it needs (as demo.sh), builds `tern`, `tern-router`
# and `tern-agent` with the test suite's (debug) profile, so a checkout that
# ran the tests builds nothing new, and runs `tern verify` with any
# arguments given here (see `tern verify --help`), e.g.
#   e2e/verify.sh --runs 20 --seed 1 --duration 30
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
e2e/install-deps.sh
e2e/build-tools.sh etcd toxiproxy
cargo build --locked -p tern-cli -p tern-router -p tern-agent
exec target/debug/tern verify "$@"
