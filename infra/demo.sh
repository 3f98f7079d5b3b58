#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded default, from scratch, on ONE local Ray head.
#
#   infra/demo.sh OUT [PORT]
#
# Where the waiting went before: every `emoji-ldm` command started (and stopped) a local Ray of its
# own, and every step waited for the one before it even where it needs nothing from it. Here:
#   - one Ray head is started first, RAY_ADDRESS points every command at it, and it is stopped at the
#     end, on failure and on Ctrl-C alike. It is private to this run: free ports, its own temp folder
#     (no other `ray.init()` on the machine finds it) and token, stopped by its process group (never
#     `ray stop`, which would stop other people's Rays too);
#   - eval measures with the frozen judge the package ships (emoji_ldm/eval/frozen/): no judge is trained
#     here, and every run's figures are on the same instrument.
# Each step's wall time is printed as it ends and again in a table at the end (OUT/timings.txt).
# Any failing step fails the script (and `make demo`) with its exit status.
set -euo pipefail
out=${1:?usage: infra/demo.sh OUT [PORT]}
port=${2:-8000}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/.venv/bin
cli=$bin/emoji-ldm
# The model: `pixel32` (default) draws the 32x32 pixels themselves, with no VAE to train: the tiny VAE that
# `tiny` trains in the demo's minutes loses most of what tells emoji apart (the judge knew 21% of its
# reconstructions of held-out Twemoji, 39% of the images; docs/demo.md), and its minutes go to the UNet.
# DEMO_PRESET=tiny gives the latent model back, with its VAE's budget (DEMO_VAE_STEPS of DEMO_VAE_BATCH).
preset=${DEMO_PRESET:-pixel32}
case $preset in
  pixel32 | tiny) ;;
  *) echo "DEMO_PRESET must be pixel32 or tiny, got '$preset'" >&2; exit 2 ;;
esac
vae_steps=${DEMO_VAE_STEPS:-1200}
vae_batch=${DEMO_VAE_BATCH:-8}
# The UNet's steps, so that the whole demo, install included, fits in 15 minutes on 2 cores: the preset's own for
# pixel32 (1,600), 500 for tiny (its VAE takes the rest of the minutes); DEMO_TRAIN_STEPS sets another.
train_steps=${DEMO_TRAIN_STEPS:-}
[[ -z $train_steps || $train_steps =~ ^[1-9][0-9]*$ ]] ||
  { echo "DEMO_TRAIN_STEPS must be a whole number of steps such as 1600, got '$train_steps'" >&2; exit 2; }
if [ -z "$train_steps" ] && [ "$preset" = tiny ]; then train_steps=500; fi
steps_args=()
[ -n "$train_steps" ] && steps_args=(--max-steps "$train_steps")
# The guidance the demo samples its model at (generate, the set, eval): by default the model's own, which its card
# names (the preset's: 2.5 for pixel32, where a sweep of one model on 49 held-out captions, 12 seeds each, found
# prompt accuracy flat from 1.5 to 3 and falling above, oversaturated speckle at 5; docs/demo.md). DEMO_GUIDANCE
# sets another.
guidance=${DEMO_GUIDANCE:-}
[[ -z $guidance || $guidance =~ ^[0-9]+([.][0-9]+)?$ ]] ||
  { echo "DEMO_GUIDANCE must be a number such as 2.5, got '$guidance'" >&2; exit 2; }
guidance_args=()
[ -n "$guidance" ] && guidance_args=(--guidance "$guidance")
# Which Twemoji: "everyday" (default) keeps the smileys and the Unicode subgroups of the naming test's emoji
# without skin-tone variants (540: animals, food, weather, ...; infra/demo_twemoji.py), so the demo's minutes go
# to fewer, coherent things a person names (docs/demo.md); "base" is every emoji without skin tones (1,949);
# "all" is the whole pack.
twemoji=${DEMO_TWEMOJI:-everyday}
case $twemoji in
  base | everyday | all) ;;
  *) echo "DEMO_TWEMOJI must be base, everyday or all, got '$twemoji'" >&2; exit 2 ;;
esac
# RGBA by default; DEMO_BACKGROUND=white builds the RGB dataset every table was before (bench/alpha_quality.py)
build_args=()
[ -n "${DEMO_BACKGROUND:-}" ] && build_args=(--background "$DEMO_BACKGROUND")

now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }  # milliseconds -> seconds, one decimal
t_start=$(now_ms)
rm -rf "$out"
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
timings=$out/timings.txt
: > "$timings"

# --- cleanup: the head ---------------------------------------------------------------------------
head_pid=
raytmp=$(mktemp -d /tmp/rdemo-XXXXXX)  # short: Ray's socket paths live under it (108-byte limit)
stop_head() {
  if [ -n "$head_pid" ]; then
    kill -TERM -- "-$head_pid" 2> /dev/null || true
    for _ in $(seq 100); do kill -0 "$head_pid" 2> /dev/null || break; sleep 0.2; done
    kill -KILL -- "-$head_pid" 2> /dev/null || true
    head_pid=
  fi
}
on_exit() {
  local rc=$?
  stop_head
  if [ "$rc" = 0 ]; then
    rm -rf "$raytmp"
  else  # Ray's own logs stay for the post-mortem
    echo "make demo: FAILED (exit $rc); see the output above, $out/logs/, $out/ray-head.log and Ray's logs" \
      "in $raytmp/ray/session_latest/logs/" >&2
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the Ray head -------------------------------------------------------------------------------
# Its temp folder is $RAY_TMPDIR/ray (not `--temp-dir`): that is where `ray start` records the head as the
# machine's current cluster and where Ray's own processes look for it (Ray Train's placement-group cleaner
# asks the State API without an address; with other Rays on the machine it would otherwise fail).
# Free ports for those Ray would otherwise take at fixed numbers (6379, 8265, 10001, 52365), and a token
# for Ray's token authentication: an explicit address (RAY_ADDRESS) never turns it on by itself, so the
# head and every command get RAY_AUTH_MODE=token and this token file.
export RAY_TMPDIR=$raytmp RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$raytmp/auth_token
read -r gcs_port dash_port client_port agent_port < <(umask 077 && "$bin/python" - <<'EOF'
import os, secrets, socket
with open(os.environ["RAY_AUTH_TOKEN_PATH"], "w") as f:
    f.write(secrets.token_hex(32))
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
# `--block` in a session of its own: ending this process group takes the head's processes with it;
# no drain wait on SIGTERM (the default waits up to 30 s): by then nothing runs on it
RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 setsid "$bin/ray" start --head --block --node-ip-address 127.0.0.1 \
  --port "$gcs_port" --num-cpus $(($(nproc) + 1)) \
  --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" --include-dashboard true \
  --ray-client-server-port "$client_port" --dashboard-agent-listen-port "$agent_port" \
  --disable-usage-stats > "$out/ray-head.log" 2>&1 < /dev/null &
head_pid=$!
export RAY_ADDRESS=127.0.0.1:$gcs_port

wait_head() {  # up once `ray start` says so and the dashboard (Ray Train needs its State API) answers
  for _ in $(seq 900); do
    if grep -q "Ray runtime started" "$out/ray-head.log" && curl -s -o /dev/null "http://127.0.0.1:$dash_port/"; then
      return 0
    fi
    if ! kill -0 "$head_pid" 2> /dev/null; then
      echo "the Ray head exited; its log:" >&2
      tail -20 "$out/ray-head.log" >&2
      return 1
    fi
    sleep 0.2
  done
  echo "the Ray head did not come up in 180 s; see $out/ray-head.log" >&2
  return 1
}

# --- the steps ----------------------------------------------------------------------------------
step() {  # step NAME COMMAND...: run it, time it, fail the demo if it fails
  local name=$1 t0 rc=0
  shift
  echo "==> [demo] $(date +%T) $name: $*"
  t0=$(now_ms)
  "$@" || rc=$?
  printf '%-10s %7s s%s\n' "$name" "$(secs $(($(now_ms) - t0)))" "$([ "$rc" = 0 ] || echo "  FAILED (exit $rc)")" \
    | tee -a "$timings"
  return "$rc"
}
step ray-head wait_head
source=twemoji
if [ "$twemoji" != all ]; then  # a folder of the pack's PNGs without skin tones, titled and tagged as `twemoji` does
  step subset "$bin/python" "$root/infra/demo_twemoji.py" "$out/twemoji-$twemoji" --subset "$twemoji"
  source=dir:$out/twemoji-$twemoji
fi
step build "$cli" dataset build --source "$source" --out "$out/twemoji" --message "make demo ($twemoji Twemoji)" \
  "${build_args[@]}"
step caption "$cli" dataset caption "$out/twemoji" --captioner metadata
step show "$cli" dataset show "$out/twemoji" --sheet "$out/twemoji-sheet.png"
# pixel32: the images as 16x16x16 patches, nothing to train first; tiny: its VAE trained first, 1,200 steps of 8
# images instead of the preset's 1,000 of 32 (the batch, not the images, held it back; bench/demo_quality.py)
vae_args=()
[ "$preset" = tiny ] && vae_args=(--vae-steps "$vae_steps" --set vae.train_batch_size="$vae_batch")
step encode "$cli" encode --dataset "$out/twemoji" --preset "$preset" --out "$out/latents" "${vae_args[@]}"
# the UNet's cosine schedule fitted to its steps; channels-last convolutions (about 10% faster on CPU, the same work)
step train "$cli" train --data "$out/latents" --preset "$preset" --out "$out/run" --workers 2 --zero-stage 2 \
  "${steps_args[@]}" --channels-last
# typed as a user types it: the model card's prompt_style gives it the form of the captions it learned
step generate "$cli" generate --model "$out/run" --prompt "grinning face" --n 8 "${guidance_args[@]}" \
  --out "$out/generated"
step serve-set "$root/infra/demo_set.sh" "$out/run" "$out/serve" "$port" "$guidance"
step lineage "$cli" lineage "$out"/serve/emoji-set/set-*/red_heart.png
# not beside generate and serve: their torch thread pools and eval's would fight over the same 2 cores
step eval "$cli" eval --model "$out/run" --data "$out/latents" "${guidance_args[@]}" --out "$out/eval.json"
t0=$(now_ms)
stop_head
printf '%-10s %7s s\n' ray-stop "$(secs $(($(now_ms) - t0)))" | tee -a "$timings"
printf '%-10s %7s s\n' total "$(secs $(($(now_ms) - t_start)))" \
  >> "$timings"

echo
echo "wall time per step ($timings):"
cat "$timings"
echo
echo "the emoji set ($out/serve/emoji-set.zip), over a checkerboard:"
"$bin/python" "$root/infra/show_set.py" "$out"/serve/emoji-set/set-*/ || true  # a preview; never fails the demo
echo "samples during training: $out/run/samples/  loss curve: $out/run/loss.png  generated: $out/generated/sheet.png" \
  " emoji set: $out/serve/emoji-set.zip  eval: $out/eval.json  tensorboard --logdir $out/run/tensorboard"
