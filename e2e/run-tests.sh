#!/usr/bin/env bash
# Runs the workspace's test binaries (built already), two at a time, except
# those that must have the machine to themselves or wait for the late Go
# build. Called by e2e/test.sh.
#
# Why not `cargo test --workspace`: it runs one binary after another, and
# most of tern's binaries spend their time waiting (links delayed by
# toxiproxy, leases expiring, pods starting), so a run used about half of
# two cores. Cargo holds the build directory's lock while tests run, so two
# `cargo test`s cannot share it either; the binaries are run directly, as
# cargo would (from their package's directory, with its CARGO_* variables).
#
# Alone, one after the other, after the rest, once the late Go build
# (Jaeger, the node's binaries: e2e/test.sh starts it at the lowest CPU
# priority beside everything else) is done:
# - tests/tracing.rs: finds a trace in Jaeger;
# - tests/lag.rs: its lag bounds are tight (heartbeat + 20 ms), and a
#   second deployment on the same two cores, or a compiler, eats into
#   them. (The agent's other tests, tests/agent.rs, run with the rest.)
# - tests/nodes.rs: three clusters with a kubelet and containerd each keep
#   both cores busy.
#
# Each binary's output is kept apart and printed whole when it ends. After
# a failure no further binary starts; the ones running finish.
#
# Usage: e2e/run-tests.sh LISTING
#        e2e/run-tests.sh --wait-late-build   (only waits for the late build)
#   LISTING: the output of `cargo test --no-run --message-format=json`.
#   TERN_LATE_BUILD: the late build's directory (its log, and its exit
#   status once it ends); unset: every binary is built already.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Waits for the late Go build and prints its output; fails if it failed.
wait_late_build() {
  local dir=${TERN_LATE_BUILD:-} began=$SECONDS status
  [ -n "$dir" ] || return 0
  if [ ! -e "$dir/status" ]; then
    echo "run-tests.sh: waiting for the late Go build (Jaeger, the node's binaries)"
  fi
  while [ ! -e "$dir/status" ]; do sleep 2; done
  cat "$dir/log"
  status=$(cat "$dir/status")
  if [ "$status" != 0 ]; then
    echo "run-tests.sh: the late Go build failed (exit $status); its output is above" >&2
    return 1
  fi
  echo "run-tests.sh: the late Go build is done (waited $((SECONDS - began)) s)"
}

if [ "${1:-}" = --wait-late-build ]; then
  wait_late_build
  exit
fi
listing=$1

# Targets that run alone, by test target name, in this order.
alone="tracing lag nodes"
# The rest, longest first, so that the short ones fill in at the end; what
# is not named here (the unit tests, new targets) comes after them.
longest_first="migration operator verify failover agent drain router demo membership validation agent_status backup kubectl_plugin"

# "manifest_dir executable" of every test binary (a compiler-artifact line,
# built with the test profile, with an executable: not the binaries built
# for the integration tests to run; paths have no quotes in them).
mapfile -t built < <(sed -n 's/.*"manifest_path":"\([^"]*\)\/Cargo.toml".*"profile":{[^}]*"test":true}.*"executable":"\([^"]*\)".*/\1 \2/p' "$listing")
if [ "${#built[@]}" = 0 ]; then
  echo "run-tests.sh: no test binaries in $listing" >&2
  exit 1
fi

# A binary's target name: its file name without cargo's hash.
target_of() { local f=${1##*/}; echo "${f%-*}"; }

pooled=()
solo=()
for name in $longest_first; do
  for b in "${built[@]}"; do
    [ "$(target_of "${b#* }")" = "$name" ] && pooled+=("$b")
  done
done
for name in $alone; do
  for b in "${built[@]}"; do
    [ "$(target_of "${b#* }")" = "$name" ] && solo+=("$b")
  done
done
for b in "${built[@]}"; do
  name=$(target_of "${b#* }")
  if [[ " $alone $longest_first " != *" $name "* ]]; then
    pooled+=("$b")
  fi
done

logs=$(mktemp -d "${TMPDIR:-/tmp}/tern-tests.XXXXXX")
declare -A running=() # pid -> "index started"
jobs_of=()
failed=()
on_exit() {
  local pid i
  for pid in "${!running[@]}"; do
    kill -- -"$pid" 2>/dev/null || true
    # Stopped before its end (a CI timeout, ^C): what it printed so far.
    read -r i _ <<<"${running[$pid]}"
    echo "---- ${jobs_of[i]#* } (stopped)"
    cat "$logs/$i.log" 2>/dev/null || true
  done
  rm -rf "$logs"
}
trap on_exit EXIT

start() {
  local i=$1 dir=${2% *} exe=${2#* }
  # Its own session: a binary stopped by the trap above goes with whatever
  # it started that did not leave the group. setsid does not fork here (a
  # script's background job is not a group leader without job control),
  # so $! is the session's leader and its group's id.
  (
    cd "$dir"
    export CARGO_MANIFEST_DIR="$dir"
    exec setsid "$exe" --test-threads=2
  ) >"$logs/$i.log" 2>&1 &
  running[$!]="$i $SECONDS"
  jobs_of[i]=$2
}

# Waits for one running binary, prints its output, notes a failure.
reap() {
  local pid status=0 i began exe
  wait -n -p pid "${!running[@]}" || status=$?
  read -r i began <<<"${running[$pid]}"
  unset "running[$pid]"
  exe=${jobs_of[i]#* }
  echo
  echo "---- ${exe#"$repo"/} ($((SECONDS - began)) s, exit $status)"
  cat "$logs/$i.log"
  if [ "$status" != 0 ]; then failed+=("${exe#"$repo"/}"); fi
}

i=0
for b in "${pooled[@]}"; do
  [ "${#failed[@]}" = 0 ] || break
  while [ "${#running[@]}" -ge 2 ]; do reap; done
  [ "${#failed[@]}" = 0 ] || break
  start "$i" "$b"
  i=$((i + 1))
done
while [ "${#running[@]}" -gt 0 ]; do reap; done
if [ "${#failed[@]}" = 0 ]; then wait_late_build || failed+=("the late Go build"); fi
for b in "${solo[@]}"; do
  [ "${#failed[@]}" = 0 ] || break
  start "$i" "$b"
  i=$((i + 1))
  reap
done

if [ "${#failed[@]}" != 0 ]; then
  echo
  echo "run-tests.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo
echo "run-tests.sh: ${#built[@]} test binaries passed"
