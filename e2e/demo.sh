#!/usr/bin/env bash
# The local three-region demo: installs what it needs (protoc from Debian,
# the pinned etcd and toxiproxy built from the Go module proxy), builds the
# `tern` command in release mode, and runs `tern demo` with any arguments
# given here (see `tern demo --help`; --keep stays up for `tern put/get`).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
e2e/install-deps.sh
e2e/build-tools.sh etcd toxiproxy
cargo build --release --locked -p tern-cli
exec target/release/tern demo "$@"
