#!/usr/bin/env bash
# An S3 server on this machine for development: moto_server on 127.0.0.1 (the cluster runs MinIO;
# its server binary is not in the registries these machines reach, moto's is on PyPI).
#
#   infra/local_s3.sh start   start it, create the emoji-ldm bucket as the minio-bucket Job does,
#                             and write $STATE/s3.env with the AWS variables (source it)
#   infra/local_s3.sh stop
#
# S3_PORT (default 9000) and EMOJI_LDM_LOCAL (the state folder, default .local) override.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=${EMOJI_LDM_LOCAL:-$root/.local}
port=${S3_PORT:-9000}
bin=$root/.venv/bin

running() { [ -f "$state/s3.pid" ] && kill -0 "$(cat "$state/s3.pid")" 2>/dev/null; }

case "${1:-}" in
  start)
    mkdir -p "$state"
    if running; then echo "S3 server already running (pid $(cat "$state/s3.pid")); source $state/s3.env"; exit 0; fi
    "$bin/moto_server" -H 127.0.0.1 -p "$port" > "$state/s3.log" 2>&1 &
    echo $! > "$state/s3.pid"
    cat > "$state/s3.env" <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=emoji-ldm
export AWS_SECRET_ACCESS_KEY=emoji-ldm-local
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
ENV
    for _ in $(seq 100); do
      (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
      running || { echo "moto_server exited; see $state/s3.log" >&2; exit 1; }
      sleep 0.2
    done
    # shellcheck disable=SC1091
    source "$state/s3.env"
    "$bin/python" "$root/infra/local_bucket.py"
    echo "S3 server on http://127.0.0.1:$port (pid $(cat "$state/s3.pid")); run: source $state/s3.env" ;;
  stop)
    if running; then kill "$(cat "$state/s3.pid")"; echo "S3 server stopped"; else echo "no S3 server running"; fi
    rm -f "$state/s3.pid" ;;
  *)
    sed -n '2,10p' "$0"; exit 2 ;;
esac
