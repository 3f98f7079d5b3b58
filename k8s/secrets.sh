#!/usr/bin/env bash
# Create the Secrets emoji-ldm's manifests read, each with fresh random values, and only where it does not
# exist yet: running this again (or `kubectl apply -k`, which carries no Secret) never replaces a password or
# token that pods already use. No secret value is committed in k8s/.
#
#   k8s/secrets.sh [NAMESPACE]     (default emoji-ldm; needs kubectl and openssl)
#
#   emoji-ldm-s3         S3 settings of every pod (envFrom) and MinIO's root credentials: user emoji-ldm, a
#                        random password, the in-cluster MinIO endpoint. To use AWS S3 or another store instead,
#                        create this Secret yourself with the same keys before running this.
#   emoji-ldm-ray-token  `auth_token`: Ray's token authentication on every RayCluster, RayJob and RayService
#                        (`authOptions`); `emoji-ldm submit` and `emoji-ldm jobs` read it as RAY_AUTH_TOKEN.
#
# The API keys' Secret (emoji-ldm-api-keys) is made from a key file, as any time keys change:
#   emoji-ldm keys create --file keys.json --name alice
#   emoji-ldm keys secret --file keys.json | kubectl -n emoji-ldm apply -f -
set -euo pipefail
ns=${1:-emoji-ldm}
case "$ns" in -h | --help) sed -n '2,17p' "$0"; exit 2 ;; esac
command -v kubectl > /dev/null || { echo "kubectl is not installed" >&2; exit 2; }
command -v openssl > /dev/null || { echo "openssl is not installed (it makes the random values)" >&2; exit 2; }

kubectl get namespace "$ns" > /dev/null 2>&1 || kubectl create namespace "$ns"

create() {  # create NAME KEY=VALUE...: a generic Secret, unless one of that name exists
  local name=$1
  shift
  if kubectl -n "$ns" get secret "$name" > /dev/null 2>&1; then
    echo "secret/$name exists in $ns: kept as it is"
    return
  fi
  local args=()
  for pair in "$@"; do args+=("--from-literal=$pair"); done
  kubectl -n "$ns" create secret generic "$name" "${args[@]}"
  kubectl -n "$ns" label secret "$name" app.kubernetes.io/part-of=emoji-ldm emoji-ldm/component=store > /dev/null
}

create emoji-ldm-s3 \
  AWS_ACCESS_KEY_ID=emoji-ldm \
  "AWS_SECRET_ACCESS_KEY=$(openssl rand -hex 32)" \
  "AWS_ENDPOINT_URL=http://minio.$ns.svc.cluster.local:9000" \
  AWS_REGION=us-east-1 \
  AWS_ALLOW_HTTP=true
create emoji-ldm-ray-token "auth_token=$(openssl rand -hex 32)"
kubectl -n "$ns" get secret emoji-ldm-api-keys > /dev/null 2>&1 || \
  echo "no secret/emoji-ldm-api-keys yet: the service starts once it exists (emoji-ldm keys create, then" \
       "emoji-ldm keys secret --file keys.json | kubectl -n $ns apply -f -)"
