#!/usr/bin/env bash
# Build the CPU and GPU images from infra/Dockerfile and push them (needs a Docker engine).
#
#   infra/build_push.sh REGISTRY          build both, tag REGISTRY/emoji-ldm:<ray>-py311-{cpu,gpu}, push
#   infra/build_push.sh --kind [CLUSTER]  build the CPU image and load it into a kind cluster (local overlay)
#
# The tag is the pinned Ray version from pyproject.toml plus the base image variant, the same tags
# the manifests in k8s/ use; for the gpu overlay set its `images.newName` to REGISTRY/emoji-ldm.
set -euo pipefail
cd "$(dirname "$0")/.."
ray_version=$(sed -n 's/.*"ray\[[^]]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
[ -n "$ray_version" ] || { echo "no exact ray==X.Y.Z pin in pyproject.toml" >&2; exit 2; }

build() {  # build VARIANT TORCH_INDEX_URL
  local tag=emoji-ldm:$ray_version-$1
  echo "building $tag"
  docker build -f infra/Dockerfile --build-arg RAY_VERSION="$ray_version" --build-arg VARIANT="$1" \
    --build-arg TORCH_INDEX_URL="$2" -t "$tag" .
}

case "${1:-}" in
  "" | -h | --help)
    sed -n '2,9p' "$0"; exit 2 ;;
  --kind)
    build py311-cpu https://download.pytorch.org/whl/cpu
    kind load docker-image "emoji-ldm:$ray_version-py311-cpu" --name "${2:-kind}" ;;
  *)
    registry=${1%/}
    build py311-cpu https://download.pytorch.org/whl/cpu
    build py311-gpu ""
    for variant in py311-cpu py311-gpu; do
      docker tag "emoji-ldm:$ray_version-$variant" "$registry/emoji-ldm:$ray_version-$variant"
      docker push "$registry/emoji-ldm:$ray_version-$variant"
    done ;;
esac
