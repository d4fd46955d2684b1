#!/usr/bin/env bash
# Installs the system packages tern's build and tests use, from Debian, when
# they are missing and this runs as root: protoc (etcd-client and the router
# compile .proto files at build time) and ShellCheck (lints the scripts);
# with --node (the node e2e), nftables (kube-proxy's nftables mode runs nft)
# and libseccomp's headers (runc is built with seccomp).
set -euo pipefail

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if [ "${1:-}" = --node ]; then
  command -v nft >/dev/null 2>&1 || missing+=(nftables)
  [ -f /usr/include/seccomp.h ] || missing+=(libseccomp-dev)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps.sh: please install ${missing[*]} (Debian/Ubuntu package names)" >&2
  command -v protoc >/dev/null 2>&1 || exit 1
  exit 0
fi
echo "install-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
  { apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null; }
