#!/usr/bin/env bash
# Runs the workspace's test binaries (built already), two at a time, except
# those that must have the machine to themselves. Called by e2e/test.sh.
#
# Why not `cargo test --workspace`: it runs one binary after another, and
# most of tern's binaries spend their time waiting (links delayed by
# toxiproxy, leases expiring, pods starting), so a run used about half of
# two cores. Cargo holds the build directory's lock while tests run, so two
# `cargo test`s cannot share it either; the binaries are run directly, as
# cargo would (from their package's directory, with its CARGO_* variables).
#
# Alone, one after the other, after the rest:
# - tests/nodes.rs: three clusters with a kubelet and containerd each keep
#   both cores busy;
# - tests/lag.rs: its lag bounds are tight (heartbeat + 20 ms), and a
#   second deployment on the same two cores eats into them. (The agent's
#   other tests, tests/agent.rs, run with the rest.)
#
# Each binary's output is kept apart and printed whole when it ends. After
# a failure no further binary starts; the ones running finish.
#
# Usage: e2e/run-tests.sh LISTING
#   LISTING: the output of `cargo test --no-run --message-format=json`.
set -euo pipefail
listing=$1
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Targets that run alone, by test target name.
alone=" nodes lag "
# The rest, longest first, so that the short ones fill in at the end; what
# is not named here (the unit tests, new targets) comes after them.
longest_first="migration operator verify failover agent drain router demo membership validation agent_status backup kubectl_plugin tracing"

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
for b in "${built[@]}"; do
  name=$(target_of "${b#* }")
  if [[ "$alone" == *" $name "* ]]; then
    solo+=("$b")
  elif [[ " $longest_first " != *" $name "* ]]; then
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
