#!/usr/bin/env bash
# Builds the real components that tern's tests and local demo run, from the Go
# module proxy, at the versions pinned by the go.mod files under
# e2e/controlplane/: kube-apiserver and kubectl (Kubernetes v1.37), etcd and
# etcdctl (v3.6), toxiproxy-server (v2.5), Jaeger v2 (cmd/jaeger, module
# v1.76). Each module is built only when its
# pin changed or a binary is missing, so a warm run costs a few hashes.
#
# Output: $TERN_ASSETS (default: <repo>/target/controlplane/bin).
# Usage:  e2e/build-tools.sh [module ...]   (default: every module)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
modules_dir="$repo/e2e/controlplane"
out=${TERN_ASSETS:-"$repo/target/controlplane/bin"}
mkdir -p "$out"

# The binaries each module provides: "<output name>=<package>".
binaries_of() {
  case "$1" in
    kubernetes) echo "kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kubectl=k8s.io/kubernetes/cmd/kubectl" ;;
    etcd) echo "etcd=go.etcd.io/etcd/server/v3 etcdctl=go.etcd.io/etcd/etcdctl/v3" ;;
    toxiproxy) echo "toxiproxy-server=github.com/Shopify/toxiproxy/v2/cmd/server" ;;
    jaeger) echo "jaeger=github.com/jaegertracing/jaeger/cmd/jaeger" ;;
    *) echo "build-tools.sh: unknown module '$1' (known: kubernetes etcd toxiproxy jaeger)" >&2; return 1 ;;
  esac
}

# A binary built from a module, not from its release tree, reports version
# v0.0.0 unless the version variables are stamped in; kubectl's version-skew
# check and `kubectl version` need the real one.
version_ldflags() {
  local module=$1 dir=$2 v
  case "$module" in
    kubernetes)
      v=$(cd "$dir" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
      local minor=${v#v1.}; minor=${minor%%.*}
      local flags="" pkg
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
      done
      echo "$flags" ;;
    *) echo "" ;;
  esac
}

if ! command -v go >/dev/null 2>&1; then
  echo "build-tools.sh: Go is needed to build the pinned test binaries; install Go 1.26 or newer" >&2
  exit 1
fi

build_module() {
  local module=$1 dir="$modules_dir/$1"
  local stamp="$out/.pin-$module"
  local want
  want=$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -d' ' -f1)
  local missing=0 pair
  for pair in $(binaries_of "$module"); do
    [ -x "$out/${pair%%=*}" ] || missing=1
  done
  if [ "$missing" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "build-tools: $module up to date in $out"
    return 0
  fi
  echo "build-tools: building $module (pinned in $dir/go.mod) into $out"
  local start=$SECONDS
  local ldflags
  ldflags="-s -w $(version_ldflags "$module" "$dir")"
  for pair in $(binaries_of "$module"); do
    # -trimpath and stripped symbols: smaller binaries, faster links, and the
    # same output wherever the checkout lives.
    (cd "$dir" && go build -mod=readonly -trimpath -ldflags="$ldflags" -o "$out/${pair%%=*}" "${pair#*=}")
  done
  echo "$want" >"$stamp"
  echo "build-tools: $module built in $((SECONDS - start)) s"
}

if [ $# -eq 0 ]; then set -- etcd toxiproxy kubernetes jaeger; fi
for m in "$@"; do build_module "$m"; done
