#!/usr/bin/env bash
# Installs the system packages tern's build and tests use, from Debian, when
# they are missing and this runs as root: protoc (etcd-client and the router
# compile .proto files at build time) and ShellCheck (lints the scripts).
set -euo pipefail

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
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
