#!/usr/bin/env bash
# Builds the real components that tern's tests and local demo run, from the Go
# module proxy, at the versions pinned by the go.mod files under
# e2e/controlplane/: kube-apiserver and kubectl (Kubernetes v1.37), etcd,
# etcdctl and etcdutl (v3.6; etcdutl restores backups), toxiproxy-server (v2.5), Jaeger v2 (cmd/jaeger, module
# v1.76). With `node` (the node e2e, TERN_NODE_E2E=1): kubelet,
# kube-controller-manager, kube-scheduler and kube-proxy (same Kubernetes
# pin), containerd v2.4 with ctr and its runc shim, runc v1.4 (with
# seccomp: needs cgo and libseccomp-dev), the CNI plugins v1.10, and the
# pause binary compiled from the Kubernetes module's own source. Each module
# is built only when its pin changed or a binary is missing, so a warm run
# costs a few hashes.
#
# Output: $TERN_ASSETS (default: <repo>/target/controlplane/bin).
# Usage:  e2e/build-tools.sh [module ...]
#   (default: etcd toxiproxy kubernetes jaeger; `node` adds the node e2e's
#   kubernetes-node containerd runc cni pause)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
modules_dir="$repo/e2e/controlplane"
out=${TERN_ASSETS:-"$repo/target/controlplane/bin"}
mkdir -p "$out"

# The binaries each module provides: "<output name>=<package>".
binaries_of() {
  case "$1" in
    kubernetes) echo "kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kubectl=k8s.io/kubernetes/cmd/kubectl" ;;
    etcd) echo "etcd=go.etcd.io/etcd/server/v3 etcdctl=go.etcd.io/etcd/etcdctl/v3 etcdutl=go.etcd.io/etcd/etcdutl/v3" ;;
    toxiproxy) echo "toxiproxy-server=github.com/Shopify/toxiproxy/v2/cmd/server" ;;
    jaeger) echo "jaeger=github.com/jaegertracing/jaeger/cmd/jaeger" ;;
    kubernetes-node) echo "kubelet=k8s.io/kubernetes/cmd/kubelet kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler kube-proxy=k8s.io/kubernetes/cmd/kube-proxy" ;;
    containerd) echo "containerd=github.com/containerd/containerd/v2/cmd/containerd ctr=github.com/containerd/containerd/v2/cmd/ctr containerd-shim-runc-v2=github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2" ;;
    runc) echo "runc=github.com/opencontainers/runc" ;;
    cni) echo "cni/bridge=github.com/containernetworking/plugins/plugins/main/bridge cni/host-local=github.com/containernetworking/plugins/plugins/ipam/host-local cni/loopback=github.com/containernetworking/plugins/plugins/main/loopback" ;;
    *) echo "build-tools.sh: unknown module '$1' (known: kubernetes etcd toxiproxy jaeger node kubernetes-node containerd runc cni pause)" >&2; return 1 ;;
  esac
}

# A binary built from a module, not from its release tree, reports version
# v0.0.0 unless the version variables are stamped in; kubectl's version-skew
# check and `kubectl version` need the real one.
version_ldflags() {
  local module=$1 dir=$2 v
  case "$module" in
    kubernetes|kubernetes-node)
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

# The Go module directory of a module: the node's Kubernetes binaries share
# the control plane's pin.
dir_of() {
  case "$1" in
    kubernetes-node) echo "$modules_dir/kubernetes" ;;
    *) echo "$modules_dir/$1" ;;
  esac
}

# How each module is compiled. The Kubernetes binaries are static (no cgo),
# as Kubernetes releases them, and the control plane's and the node's alike:
# cgo changes the net package, and with it every package above it, so a
# control plane built with cgo would leave the node's build (kubelet and the
# rest) nothing to reuse from the shared cache. runc links libseccomp so
# that RuntimeDefault seccomp profiles work; containerd leaves out the
# snapshotters it cannot use here.
go_env_of() {
  case "$1" in
    runc) echo "CGO_ENABLED=1" ;;
    kubernetes|kubernetes-node|containerd|cni) echo "CGO_ENABLED=0" ;;
    *) echo "" ;;
  esac
}
tags_of() {
  case "$1" in
    runc) echo "seccomp" ;;
    containerd) echo "no_btrfs no_devmapper no_zfs" ;;
    *) echo "" ;;
  esac
}

# The pause binary every pod sandbox runs, compiled from the pinned
# Kubernetes module's build/pause source; static, so its image needs nothing
# else.
build_pause() {
  local dir="$modules_dir/kubernetes" src stamp="$out/.pin-pause" want
  src=$(cd "$dir" && go mod download -json k8s.io/kubernetes | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')/build/pause/linux/pause.c
  want=$(sha256sum "$src" | cut -d' ' -f1)
  if [ -x "$out/pause" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "build-tools: pause up to date in $out"
    return 0
  fi
  command -v gcc >/dev/null 2>&1 || { echo "build-tools.sh: gcc is needed to compile pause.c" >&2; return 1; }
  gcc -static -O2 -o "$out/pause" "$src"
  echo "$want" >"$stamp"
  echo "build-tools: pause built from $src"
}

build_module() {
  local module=$1 dir
  dir=$(dir_of "$module")
  if [ "$module" = pause ]; then build_pause; return; fi
  local stamp="$out/.pin-$module"
  local want go_env tags
  go_env=$(go_env_of "$module")
  tags=$(tags_of "$module")
  # The pin and how it is compiled: a change to either rebuilds.
  want=$( (cat "$dir/go.mod" "$dir/go.sum"; echo "env=$go_env tags=$tags") | sha256sum | cut -d' ' -f1)
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
    mkdir -p "$(dirname "$out/${pair%%=*}")"
    # -trimpath and stripped symbols: smaller binaries, faster links, and the
    # same output wherever the checkout lives.
    # shellcheck disable=SC2086 # go_env is empty or one VAR=value word
    (cd "$dir" && env $go_env go build -mod=readonly -trimpath -tags="$tags" -ldflags="$ldflags" -o "$out/${pair%%=*}" "${pair#*=}")
  done
  echo "$want" >"$stamp"
  echo "build-tools: $module built in $((SECONDS - start)) s"
}

# Go's build cache holds about 9 GB after a cold build of these modules and
# is of no use once the binaries are here (a warm run builds nothing, and a
# pin change rebuilds that module). It lives in a directory of this run and
# goes with it, unless TERN_GO_CACHE names one the caller removes
# (e2e/test.sh shares one between its two calls, so the node's Kubernetes
# binaries reuse the control plane's packages). Downloaded modules stay in
# Go's usual module cache, for the next pin change.
if [ -n "${TERN_GO_CACHE:-}" ]; then
  export GOCACHE="$TERN_GO_CACHE"
else
  GOCACHE=$(mktemp -d "${TMPDIR:-/tmp}/tern-go-build.XXXXXX")
  export GOCACHE
  trap 'rm -rf "$GOCACHE"' EXIT
fi

if [ $# -eq 0 ]; then set -- etcd toxiproxy kubernetes jaeger; fi
for m in "$@"; do
  if [ "$m" = node ]; then
    for n in kubernetes-node containerd runc cni pause; do build_module "$n"; done
  else
    build_module "$m"
  fi
done
