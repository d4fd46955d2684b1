#!/usr/bin/env bash
# Builds the tern images: tern-operator, tern-router and tern-agent.
#
# With a container engine (Docker, Podman or Buildah), from source with the
# multi-stage Dockerfile next to this script:
#   operator/deploy/images/build.sh [--engine docker|podman|buildah] [--push]
#
# Without one (no daemon, no registry: the node e2e on a machine without
# Docker), from binaries already built, as OCI image archives that
# `ctr images import` and `kind load image-archive` take. Each image is one
# layer FROM scratch: the binary, the shared libraries it links (found with
# ldd), and an /etc/passwd naming user 65532. --etcd adds the pinned etcd
# under the name the operator's manifests reference, so the image the
# RegionGroup names is the etcd the tests run; like etcd's own image, it
# carries the etcdutl beside it (a restore Job runs it):
#   operator/deploy/images/build.sh --oci-archives DIR [--bin-dir target/release] \
#     [--etcd target/controlplane/bin/etcd] [--add-image NAME=BINARY[,BINARY...] ...]
# (--add-image: any other image of a few binaries, e.g. the node e2e's pause
# image, run as root with the first binary as its entrypoint.)
#
# Names: REGISTRY/tern-<component>:TAG. REGISTRY defaults to ghcr.io/tern-dev
# and TAG to the workspace version; the operator's default images, the
# install bundle and this script agree (a test in operator/tests checks it).
# TERN_IMAGE_REGISTRY and TERN_IMAGE_TAG (or --registry, --tag) change them;
# set the operator's --router-image/--agent-image to match.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
registry=${TERN_IMAGE_REGISTRY:-ghcr.io/tern-dev}
tag=${TERN_IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)}
# The etcd image the CRDs default to (crds/src/common.rs DEFAULT_ETCD_IMAGE).
etcd_image=$(sed -n 's/^pub const DEFAULT_ETCD_IMAGE: &str = "\(.*\)";/\1/p' "$repo/crds/src/common.rs")
engine=""
push=0
oci_dir=""
bin_dir="$repo/target/release"
etcd_bin=""
extra_images=()
components=(operator router agent)

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine=$2; shift 2 ;;
    --push) push=1; shift ;;
    --registry) registry=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --oci-archives) oci_dir=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --etcd) etcd_bin=$2; shift 2 ;;
    --add-image) extra_images+=("$2"); shift 2 ;;
    --print-names)
      for c in "${components[@]}"; do echo "$registry/tern-$c:$tag"; done
      echo "$etcd_image"
      exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$tag" ] || { echo "build.sh: no version found in $repo/Cargo.toml; pass --tag" >&2; exit 1; }

binary_of() {
  case "$1" in
    operator) echo tern-operator ;;
    router) echo tern-router ;;
    agent) echo tern-agent ;;
  esac
}

# --- From source, with an engine --------------------------------------------
build_with_engine() {
  if [ -z "$engine" ]; then
    for e in docker podman buildah; do
      if command -v "$e" >/dev/null 2>&1; then engine=$e; break; fi
    done
  fi
  [ -n "$engine" ] || { echo "build.sh: no docker, podman or buildah found; install one, or use --oci-archives DIR with built binaries" >&2; exit 1; }
  local c image
  for c in "${components[@]}"; do
    image="$registry/tern-$c:$tag"
    echo "build.sh: $image ($engine)"
    if [ "$engine" = buildah ]; then
      buildah bud -f "$repo/operator/deploy/images/Dockerfile" --target "$c" -t "$image" "$repo"
    else
      "$engine" build -f "$repo/operator/deploy/images/Dockerfile" --target "$c" -t "$image" "$repo"
    fi
    if [ "$push" = 1 ]; then "$engine" push "$image"; fi
  done
}

# --- From binaries, as OCI archives -----------------------------------------
# The scratch directories of the archive being made; removed on exit, also
# on failure.
scratch=()
trap 'rm -rf ${scratch[@]+"${scratch[@]}"}' EXIT
# The platform of the binaries: this machine's.
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64|arm64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac
# sha256 of a file, hex.
digest() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# Writes an OCI image archive: oci_archive NAME ROOTFS ENTRYPOINT USER OUT
oci_archive() {
  local name=$1 rootfs=$2 entrypoint=$3 user=$4 out=$5
  local work
  work=$(mktemp -d)
  scratch+=("$work")
  mkdir -p "$work/blobs/sha256"
  # Reproducible: sorted, owned by root, no timestamps.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$work/layer.tar" .
  local layer layer_size
  layer=$(digest "$work/layer.tar"); layer_size=$(size "$work/layer.tar")
  mv "$work/layer.tar" "$work/blobs/sha256/$layer"
  printf '{"architecture":"%s","os":"linux","config":{"User":"%s","Entrypoint":["%s"],"Env":["PATH=/usr/local/bin:/usr/bin:/bin"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$arch" "$user" "$entrypoint" "$layer" >"$work/config.json"
  local config config_size
  config=$(digest "$work/config.json"); config_size=$(size "$work/config.json")
  mv "$work/config.json" "$work/blobs/sha256/$config"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
  local manifest manifest_size
  manifest=$(digest "$work/manifest.json"); manifest_size=$(size "$work/manifest.json")
  mv "$work/manifest.json" "$work/blobs/sha256/$manifest"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci-layout"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "$arch" "$name" "${name##*:}" >"$work/index.json"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work" -cf "$out" oci-layout index.json blobs
  rm -rf "$work"
}

# A root filesystem with BINARY at /usr/local/bin/NAME and the libraries it
# links: rootfs_for BINARY NAME ROOTFS
rootfs_for() {
  local binary=$1 name=$2 rootfs=$3
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp"
  cp "$binary" "$rootfs/usr/local/bin/$name"
  # ldd prints "name => /path (addr)" and the loader as "/path (addr)".
  local lib
  for lib in $(ldd "$binary" 2>/dev/null | grep -o '/[^ ]*' || true); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
}

build_archives() {
  mkdir -p "$oci_dir"
  local c bin image rootfs
  for c in "${components[@]}"; do
    bin="$bin_dir/$(binary_of "$c")"
    [ -x "$bin" ] || { echo "build.sh: $bin is missing; build it first: cargo build --release -p tern-$c" >&2; exit 1; }
    image="$registry/tern-$c:$tag"
    rootfs=$(mktemp -d); scratch+=("$rootfs")
    rootfs_for "$bin" "$(binary_of "$c")" "$rootfs"
    oci_archive "$image" "$rootfs" "/usr/local/bin/$(binary_of "$c")" 65532:65532 "$oci_dir/tern-$c.tar"
    rm -rf "$rootfs"
    echo "build.sh: $image -> $oci_dir/tern-$c.tar"
  done
  if [ -n "$etcd_bin" ]; then
    rootfs=$(mktemp -d); scratch+=("$rootfs")
    # As the upstream image: etcd and etcdutl on the PATH, run as root (the
    # pods name the command `etcd`, a restore Job `etcdutl`; the data
    # volume belongs to root).
    local etcdutl
    etcdutl="$(dirname "$etcd_bin")/etcdutl"
    [ -x "$etcdutl" ] || { echo "build.sh: $etcdutl is missing: the etcd image carries etcdutl beside etcd (e2e/build-tools.sh etcd builds both)" >&2; exit 1; }
    rootfs_for "$etcd_bin" etcd "$rootfs"
    rootfs_for "$etcdutl" etcdutl "$rootfs"
    oci_archive "$etcd_image" "$rootfs" /usr/local/bin/etcd 0:0 "$oci_dir/etcd.tar"
    rm -rf "$rootfs"
    echo "build.sh: $etcd_image -> $oci_dir/etcd.tar"
  fi
  local spec name bin file bins first
  for spec in ${extra_images[@]+"${extra_images[@]}"}; do
    name=${spec%%=*}
    IFS=, read -r -a bins <<<"${spec#*=}"
    file=$(basename "${name%%:*}").tar
    rootfs=$(mktemp -d); scratch+=("$rootfs")
    for bin in "${bins[@]}"; do
      [ -x "$bin" ] || { echo "build.sh: --add-image $spec: $bin is not an executable" >&2; exit 1; }
      rootfs_for "$bin" "$(basename "$bin")" "$rootfs"
    done
    first=$(basename "${bins[0]}")
    oci_archive "$name" "$rootfs" "/usr/local/bin/$first" 0:0 "$oci_dir/$file"
    rm -rf "$rootfs"
    echo "build.sh: $name -> $oci_dir/$file"
  done
}

if [ -n "$oci_dir" ]; then build_archives; else build_with_engine; fi
