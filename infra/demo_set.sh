#!/usr/bin/env bash
# A step of `make demo`: serve a model on Ray (the cluster of $RAY_ADDRESS, as infra/demo.sh sets it, or a
# local one of its own), ask it for one emoji set over HTTP, save the zip, and shut the service down cleanly
# (SIGTERM, which `emoji-ldm serve` handles like Ctrl-C). The set is six everyday emoji, typed by name: those the
# demo's model drew best in the blind naming test (bench/naming.py; docs/demo.md), so that its first set is one a
# newcomer names.
#
#   infra/demo_set.sh MODEL OUT_DIR [PORT] [GUIDANCE]     (GUIDANCE: the model's own when not given)
set -euo pipefail
model=$1
out=$2
port=${3:-8000}
guidance=${4:-}
bin=$(dirname "$0")/../.venv/bin
url=http://127.0.0.1:$port
mkdir -p "$out"

"$bin/emoji-ldm" serve --model "$model" --port "$port" > "$out/serve.log" 2>&1 &
pid=$!
stop() {
  kill -TERM "$pid" 2>/dev/null || true  # not INT: a background job of a script ignores SIGINT
  wait "$pid" 2>/dev/null || true
}
trap stop EXIT

for _ in $(seq 720); do  # 180 s, looking every 0.25 s
  # up once it says "serving" (from then on it handles SIGTERM) and /healthz answers
  grep -q "^serving " "$out/serve.log" && curl -sf "$url/healthz" > /dev/null && break
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "emoji-ldm serve exited; its log:" >&2
    tail -20 "$out/serve.log" >&2
    exit 1
  fi
  sleep 0.25
done
curl -sf "$url/healthz" > /dev/null || { echo "the service did not come up in 180 s; see $out/serve.log" >&2; exit 1; }
echo "service up at $url/ ; POST /v1/emoji-sets ..."

curl -sS --fail-with-body -X POST "$url/v1/emoji-sets" -H 'content-type: application/json' \
  -d '{"theme": "everyday", "template": "{item}", "seed": 1, "target": "slack"'"${guidance:+, \"guidance\": $guidance}"',
       "items": ["red heart", "grinning face", "face with tears of joy", "soccer ball", "pizza", "rainbow"]}' \
  -o "$out/emoji-set.zip"
rm -rf "$out/emoji-set"
"$bin/python" -m zipfile -e "$out/emoji-set.zip" "$out/emoji-set"
stop
trap - EXIT
grep -q "serve: stopped" "$out/serve.log" || { echo "the service did not stop cleanly; see $out/serve.log" >&2; exit 1; }
echo "service stopped cleanly"
echo "emoji set: $out/emoji-set.zip (sheet: $(ls "$out"/emoji-set/*/sheet.png))"
