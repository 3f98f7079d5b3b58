#!/usr/bin/env bash
# A Ray head on this machine for development: what `emoji-ldm submit` and the RayJobs talk to,
# with its dashboard (the Jobs API) on http://127.0.0.1:8265.
#
#   infra/local_ray_head.sh start   start it from the repository root with this checkout's .venv
#                                   first on PATH and the S3 variables of $STATE/s3.env, if present
#                                   (infra/local_s3.sh start writes them), as the pods get them
#                                   from the emoji-ldm-s3 Secret
#   infra/local_ray_head.sh stop    stops this head alone (its process group), not other Rays on the machine
#
# RAY_PORT (6379), DASHBOARD_PORT (8265), NUM_CPUS (all cores) and EMOJI_LDM_LOCAL override.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=${EMOJI_LDM_LOCAL:-$root/.local}
export PATH=$root/.venv/bin:$PATH

case "${1:-}" in
  start)
    # shellcheck disable=SC1091
    [ -f "$state/s3.env" ] && source "$state/s3.env"
    mkdir -p "$state"
    cd "$root"
    # as on the cluster's pods (infra/Dockerfile) and a stage's own Ray (emoji_ldm/runtime/connect.py): Ray's daemons
    # without jemalloc's per-thread caches, and the GCS keeping the events of the last 1,000 tasks
    export MALLOC_CONF=${MALLOC_CONF:-tcache:false}
    export RAY_task_events_max_num_task_in_gcs=${RAY_task_events_max_num_task_in_gcs:-1000}
    # `--block` in a session of its own: `stop` ends this process group, which takes the head's processes
    # with it, where `ray stop` would stop every Ray on the machine (other users', other tests')
    setsid ray start --head --block --node-ip-address 127.0.0.1 --port "${RAY_PORT:-6379}" \
      --dashboard-host 127.0.0.1 --dashboard-port "${DASHBOARD_PORT:-8265}" --include-dashboard true \
      ${NUM_CPUS:+--num-cpus "$NUM_CPUS"} --object-store-memory "${OBJECT_STORE_BYTES:-1000000000}" \
      --disable-usage-stats > "$state/ray-head.log" 2>&1 < /dev/null &
    echo $! > "$state/ray-head.pid"
    # grep without -q reads all of `ray status`: -q exits at the first match, and with pipefail the SIGPIPE
    # that `ray status` may then get would make a head that is up look down
    up() { ray status --address "127.0.0.1:${RAY_PORT:-6379}" 2> /dev/null | grep node_ > /dev/null; }
    for _ in $(seq 90); do
      up && break
      kill -0 "$(cat "$state/ray-head.pid")" 2> /dev/null || { tail -20 "$state/ray-head.log"; exit 1; }
      sleep 2
    done
    up || { tail -20 "$state/ray-head.log"; exit 1; }
    echo "Ray head up: emoji-ldm submit STAGE ... --address http://127.0.0.1:${DASHBOARD_PORT:-8265}" ;;
  stop)
    [ -f "$state/ray-head.pid" ] || { echo "no head started from $state"; exit 0; }
    pid=$(cat "$state/ray-head.pid")
    kill -TERM -- "-$pid" 2> /dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2> /dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2> /dev/null || true
    rm -f "$state/ray-head.pid"
    # what `ray stop` also does: forget this head as the machine's current cluster (where ray.init() looks)
    current=/tmp/ray/ray_current_cluster
    if [ -f "$current" ] && grep -q ":${RAY_PORT:-6379}\$" "$current"; then rm -f "$current"; fi ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
