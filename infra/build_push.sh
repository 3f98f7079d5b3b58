#!/usr/bin/env bash
# Build the CPU and GPU images from infra/Dockerfile and push them (needs a Docker engine).
#
#   infra/build_push.sh REGISTRY          build both, push REGISTRY/emoji-ldm:<ray>-py311-cpu and
#                                         REGISTRY/emoji-ldm-gpu:<ray>-py311-gpu, and pin k8s/overlays/gpu
#   infra/build_push.sh --kind [CLUSTER]  build the CPU image and load it into a kind cluster (local overlay)
#
# The tag is the pinned Ray version from pyproject.toml plus the base image variant, the same tags the
# manifests in k8s/ use. After pushing, the gpu overlay's `images` get each image's registry digest
# (`newName` REGISTRY/..., `digest` sha256:...), the MinIO and Redis images' too (pulled for it), and then
# k8s/overlays/gpu/images.pinned lists them: the overlay does not render without that file. Commit both.
# The GPU image's torch is the CUDA build below (docs/cluster.md: the NVIDIA driver it needs).
set -euo pipefail
cd "$(dirname "$0")/.."
ray_version=$(sed -n 's/.*"ray\[[^]]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
[ -n "$ray_version" ] || { echo "no exact ray==X.Y.Z pin in pyproject.toml" >&2; exit 2; }
overlay=k8s/overlays/gpu/kustomization.yaml
pins=k8s/overlays/gpu/images.pinned

image() {  # image VARIANT: the local name of a variant's image
  case "$1" in py311-gpu) echo "emoji-ldm-gpu:$ray_version-$1" ;; *) echo "emoji-ldm:$ray_version-$1" ;; esac
}

build() {  # build VARIANT TORCH_INDEX_URL TORCH_CUDA (empty: a CPU build)
  local tag
  tag=$(image "$1")
  echo "building $tag"
  docker build -f infra/Dockerfile --build-arg RAY_VERSION="$ray_version" --build-arg VARIANT="$1" \
    --build-arg TORCH_INDEX_URL="$2" --build-arg TORCH_CUDA="${3:-}" -t "$tag" .
}

digest() {  # digest REPOSITORY REFERENCE: the sha256:... the registry gave REFERENCE (pushed or pulled)
  docker inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$2" \
    | sed -n "s|^\(docker\.io/\)\{0,1\}$1@\(sha256:[0-9a-f]\{64\}\)\$|\2|p" | head -n 1
}

pin() {  # pin NAME NEW_NAME DIGEST: set the overlay's `images` entry of NAME (NEW_NAME empty: keep none)
  local tmp
  [[ "$3" =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "no registry digest for $1 (was it pushed or pulled?)" >&2; exit 1; }
  tmp=$(mktemp)
  awk -v name="$1" -v new_name="$2" -v digest="$3" '
    /^  - name: / { current = $3 }
    current == name && /^    newName: / && new_name != "" { sub(/newName: .*/, "newName: " new_name) }
    current == name && /^    digest: / { sub(/digest: sha256:[0-9a-f]*/, "digest: " digest) }
    { print }' "$overlay" > "$tmp"
  grep -q "digest: $3" "$tmp" || { echo "$overlay has no images entry for $1" >&2; rm -f "$tmp"; exit 1; }
  mv "$tmp" "$overlay"
  echo "pinned $1 to ${2:-$1}@$3 in $overlay"
}

case "${1:-}" in
  "" | -h | --help)
    sed -n '2,10p' "$0"; exit 2 ;;
  --kind)
    build py311-cpu https://download.pytorch.org/whl/cpu
    kind load docker-image "$(image py311-cpu)" --name "${2:-kind}" ;;
  *)
    registry=${1%/}
    build py311-cpu https://download.pytorch.org/whl/cpu
    build py311-gpu https://download.pytorch.org/whl/cu130 13.0
    for variant in py311-cpu py311-gpu; do
      local_tag=$(image "$variant")
      docker tag "$local_tag" "$registry/$local_tag"
      docker push "$registry/$local_tag"
      repository=$registry/${local_tag%%:*}
      pin "${local_tag%%:*}" "$repository" "$(digest "$repository" "$registry/$local_tag")"
    done
    sed -n 's/^ *image: \(\(minio\/\|redis:\)[^ ]*\).*/\1/p' k8s/base/minio.yaml k8s/base/minio.bucket-job.yaml \
        k8s/base/redis.yaml \
      | while read -r ref; do
          docker pull "$ref"
          pin "${ref%%:*}" "" "$(digest "${ref%%:*}" "$ref")"
        done
    # every entry pinned: record them; the overlay renders from now on
    grep -q 'sha256:0\{64\}' "$overlay" && { echo "$overlay still has an all-zero digest" >&2; exit 1; }
    awk '/^  - name: / { name = $3 } /^    newName: / { new_name = $2 }
         /^    digest: / { print name "=" (new_name != "" ? new_name : name) "@" $2; new_name = "" }' \
      "$overlay" > "$pins"
    echo "wrote $pins: commit it with $overlay" ;;
esac
