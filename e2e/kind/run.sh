#!/usr/bin/env bash
# The kind multi-cluster e2e, for a machine with Docker: three kind clusters,
# one per region (us-east, eu-west, ap-south), on kind's Docker network;
# pod and service ranges routed between them and each cluster's CoreDNS
# forwarding the other clusters' domains, so that the directory group forms
# across clusters from the operator's own manifests; tern's images built
# and loaded; then the scenarios of tern_e2e::scenarios (the same code the
# node e2e runs here on nodes it starts itself, e2e/tests/nodes.rs):
#   install the bundle (kubectl apply -k operator/deploy/overlays/multicluster/REGION),
#   apply e2e/kind/manifests/geocluster.yaml (with spec.tls: the scenarios
#   make a CA and create the certificate Secrets in every cluster first) and
#   jaeger.yaml,
#   a local write, a proxied write, a migration by applying an AccountMigration,
#   the trace of the cross-region write in Jaeger (us-east),
#   ap-south's node stopped (docker stop) and failed over to eu-west.
# Everything is deleted on exit, also on failure or Ctrl-C (--keep keeps it).
#
# Usage: e2e/kind/run.sh [--keep] [--skip-images]
#   KIND (default kind, v0.33: go install sigs.k8s.io/kind@v0.33.0),
#   KUBECTL (default kubectl), DOCKER (default docker),
#   KIND_NODE_IMAGE (default: kind's own for its version).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
kind=${KIND:-kind}
kubectl=${KUBECTL:-kubectl}
docker=${DOCKER:-docker}
regions=(us-east eu-west ap-south)
keep=0
skip_images=0
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    --skip-images) skip_images=1 ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "run.sh: $1 is required: $2" >&2; exit 1; }
}
need "$docker" "install Docker (or set DOCKER)"
need "$kind" "go install sigs.k8s.io/kind@v0.33.0 (or set KIND)"
need "$kubectl" "install kubectl (or set KUBECTL)"
need cargo "install Rust 1.89 or newer"
"$docker" info >/dev/null 2>&1 || { echo "run.sh: the Docker engine does not answer ('$docker info' failed)" >&2; exit 1; }

work=$(mktemp -d)
cleanup() {
  local status=$?
  if [ "$keep" = 1 ]; then
    echo "run.sh: --keep: clusters stay; kubeconfigs in $work; delete with: $kind delete clusters ${regions[*]/#/tern-}"
    return
  fi
  for r in "${regions[@]}"; do
    "$kind" delete cluster --name "tern-$r" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kubeconfig() { echo "$work/$1.kubeconfig"; }
k() { local r=$1; shift; "$kubectl" --kubeconfig "$(kubeconfig "$r")" "$@"; }
node_of() { echo "tern-$1-control-plane"; }
node_ip() { "$docker" inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' "$(node_of "$1")"; }
# The ranges in e2e/kind/cluster-REGION.yaml.
range_of() { sed -n "s/^  $2: \(.*\)$/\1/p" "e2e/kind/cluster-$1.yaml"; }

echo "== clusters"
# Clusters kept by an earlier --keep run are not this run's to delete.
for r in "${regions[@]}"; do
  if "$kind" get clusters 2>/dev/null | grep -qx "tern-$r"; then
    trap - EXIT
    echo "run.sh: a kind cluster tern-$r exists already; delete it first: $kind delete cluster --name tern-$r" >&2
    exit 1
  fi
done
node_image=()
if [ -n "${KIND_NODE_IMAGE:-}" ]; then node_image=(--image "$KIND_NODE_IMAGE"); fi
for r in "${regions[@]}"; do
  "$kind" create cluster --config "e2e/kind/cluster-$r.yaml" --kubeconfig "$(kubeconfig "$r")" \
    ${node_image[@]+"${node_image[@]}"} --wait 120s
done

echo "== routes between the clusters' pod and service ranges"
for r in "${regions[@]}"; do
  for o in "${regions[@]}"; do
    [ "$r" = "$o" ] && continue
    via=$(node_ip "$o")
    for cidr in "$(range_of "$o" podSubnet)" "$(range_of "$o" serviceSubnet)"; do
      "$docker" exec "$(node_of "$r")" ip route replace "$cidr" via "$via"
    done
  done
done

echo "== DNS: each CoreDNS forwards the other regions' domains"
for r in "${regions[@]}"; do
  corefile=$(k "$r" get configmap coredns -n kube-system -o jsonpath='{.data.Corefile}')
  for o in "${regions[@]}"; do
    [ "$r" = "$o" ] && continue
    # kube-dns is the tenth address of the cluster's service range.
    dns_ip=$(range_of "$o" serviceSubnet | sed 's#\.0/16$#.10#')
    corefile+=$'\n'"$o.tern.example:53 {"$'\n'"    errors"$'\n'"    cache 5"$'\n'"    forward . $dns_ip"$'\n'"}"
  done
  printf '%s\n' "$corefile" >"$work/Corefile-$r"
  k "$r" create configmap coredns -n kube-system --from-file=Corefile="$work/Corefile-$r" \
    --dry-run=client -o yaml | k "$r" apply -f -
  k "$r" rollout restart deployment/coredns -n kube-system
  k "$r" rollout status deployment/coredns -n kube-system --timeout=120s
done

if [ "$skip_images" = 0 ]; then
  echo "== images"
  operator/deploy/images/build.sh --engine "$docker"
fi
# Every name but the last (etcd's, which the nodes pull themselves).
for image in $(operator/deploy/images/build.sh --print-names | sed '$d'); do
  for r in "${regions[@]}"; do
    "$kind" load docker-image "$image" --name "tern-$r"
  done
done
# The image the rolling update moves the members onto: the same etcd under
# another name (tern_e2e::scenarios::retagged_etcd_image).
etcd_image=$(operator/deploy/images/build.sh --print-names | tail -n1)
retagged="localhost/tern-e2e/etcd-retagged:${etcd_image##*:}-retagged"
"$docker" pull "$etcd_image"
"$docker" tag "$etcd_image" "$retagged"
for r in "${regions[@]}"; do
  "$kind" load docker-image "$retagged" --name "tern-$r"
done

echo "== scenarios"
cargo build -p tern-e2e --bin tern-e2e-scenarios --locked
args=()
for r in "${regions[@]}"; do args+=(--kubeconfig "$r=$(kubeconfig "$r")"); done
start=$SECONDS
"${CARGO_TARGET_DIR:-$repo/target}/debug/tern-e2e-scenarios" "${args[@]}" \
  --kubectl "$(command -v "$kubectl")" \
  --stop-command "$docker stop $(node_of '{region}')"
echo "run.sh: every scenario passed in $((SECONDS - start)) s"
