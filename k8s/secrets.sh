#!/usr/bin/env bash
# Create the Secrets emoji-ldm's manifests read, each with fresh random values, and only where it does not
# exist yet: running this again (or `kubectl apply -k`, which carries no Secret) never replaces a password or
# token that pods already use. No secret value is committed in k8s/.
#
#   k8s/secrets.sh [NAMESPACE]                   MinIO in the cluster (default namespace emoji-ldm)
#   k8s/secrets.sh --s3 aws REGION [NAMESPACE]   AWS S3, credentials from the cloud (IRSA or EKS Pod Identity)
#   (needs kubectl and openssl)
#
# One trust zone per workload: ZONE is service, jobs, crawl or cluster (the RayService, the pipeline RayJobs, the
# crawl RayJob, the interactive RayCluster).
#   emoji-ldm-ray-token-ZONE  `auth_token`: Ray's token authentication of that zone's Ray clusters (`authOptions`);
#                             `emoji-ldm submit` and `emoji-ldm jobs` read it as RAY_AUTH_TOKEN.
#   emoji-ldm-s3-ZONE         the S3 settings of that zone's Ray pods (envFrom). MinIO: the zone's own MinIO user
#                             (user emoji-ldm-ZONE, a random key) that the bucket Job scopes to the zone's prefixes,
#                             and the in-cluster endpoint. AWS: AWS_REGION only; the pods' ServiceAccounts carry the
#                             IAM roles. Another S3 store: create these yourself with the same keys before running this.
#   emoji-ldm-minio-root      MinIO's root user (MinIO and the bucket Job only); not made with --s3 aws.
#   emoji-ldm-redis           `password` of the Redis that keeps the RayService's GCS state (k8s/base/redis.yaml).
#
# The API keys' Secret (emoji-ldm-api-keys) is made from a key file, as any time keys change:
#   emoji-ldm keys create --file keys.json --name alice
#   emoji-ldm keys secret --file keys.json | kubectl -n emoji-ldm apply -f -
set -euo pipefail
s3=minio
region=us-east-1
case "${1:-}" in
  -h | --help) sed -n '2,25p' "$0"; exit 2 ;;
  --s3)
    [ "${2:-}" = aws ] && [ -n "${3:-}" ] || { echo "usage: k8s/secrets.sh --s3 aws REGION [NAMESPACE]" >&2; exit 2; }
    s3=aws
    region=$3
    shift 3 ;;
esac
ns=${1:-emoji-ldm}
zones=(service jobs crawl cluster)
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

endpoint="http://minio.$ns.svc.cluster.local:9000"
if [ "$s3" = minio ]; then
  create emoji-ldm-minio-root \
    MINIO_ROOT_USER=emoji-ldm-root \
    "MINIO_ROOT_PASSWORD=$(openssl rand -hex 32)" \
    "MINIO_ENDPOINT=$endpoint"
fi
for zone in "${zones[@]}"; do
  create "emoji-ldm-ray-token-$zone" "auth_token=$(openssl rand -hex 32)"
  if [ "$s3" = minio ]; then
    create "emoji-ldm-s3-$zone" \
      "AWS_ACCESS_KEY_ID=emoji-ldm-$zone" \
      "AWS_SECRET_ACCESS_KEY=$(openssl rand -hex 32)" \
      "AWS_ENDPOINT_URL=$endpoint" \
      "AWS_REGION=$region" \
      AWS_ALLOW_HTTP=true
  else
    create "emoji-ldm-s3-$zone" "AWS_REGION=$region"
  fi
done
create emoji-ldm-redis "password=$(openssl rand -hex 32)"
kubectl -n "$ns" get secret emoji-ldm-api-keys > /dev/null 2>&1 || \
  echo "no secret/emoji-ldm-api-keys yet: the service starts once it exists (emoji-ldm keys create, then" \
       "emoji-ldm keys secret --file keys.json | kubectl -n $ns apply -f -)"
