#!/usr/bin/env bash
# `tern bench` with every section: installs what it needs (as demo.sh),
# builds tern-router twice for the telemetry section (without the `otlp`
# feature, then with the default features; both land at
# target/release/tern-router, so each is copied out) and `tern` in release
# mode, and runs `tern bench` with both routers named and any arguments
# given here (see `tern bench --help`).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
e2e/install-deps.sh
e2e/build-tools.sh etcd toxiproxy
routers=target/bench/routers
mkdir -p "$routers"
cargo build --release --locked -p tern-router --no-default-features
cp target/release/tern-router "$routers/tern-router-without-otlp"
cargo build --release --locked -p tern-router
cp target/release/tern-router "$routers/tern-router"
cargo build --release --locked -p tern-cli
exec target/release/tern bench \
  --router-binary "$routers/tern-router" \
  --router-binary-without-otlp "$routers/tern-router-without-otlp" "$@"
