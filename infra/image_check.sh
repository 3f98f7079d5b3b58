#!/usr/bin/env bash
# `make image-check`: rehearse infra/Dockerfile's steps where no Docker engine and no registry is reachable, on a
# root filesystem made from Debian's packages (mmdebstrap) and PyPI, then run the image's smoke test inside it and
# write a record of what ran.
#
#   infra/image_check.sh [--plan]     (as root: mmdebstrap and chroot; --plan prints the steps and runs nothing)
#
# What it takes from the Dockerfile itself, so the rehearsal cannot drift from it: the apt packages of its
# `apt-get install`, the paths of its COPY lines (with .dockerignore's __pycache__ rule), the torch pin, the
# `pip install` order (dependencies, then the code with --no-deps) and the build's own checks. What differs, and
# only this: the base is Debian bookworm's python3.11 in a venv at /home/ray/venv (the Ray image's is conda's
# Python 3.11 on Ubuntu), Chrome for Testing (not reachable here) is Debian's chromium, torch's CPU wheel comes
# through this machine's pip settings (download.pytorch.org is not reachable either), and the CPU variant only.
# Inside, as uid 1000:100: `emoji-ldm --version`, `import ray, deepspeed`, the ray version against the pin, a
# C compiler, a tiny training step (`emoji-ldm train-step-check --preset tiny`) and the GPU check's CPU mode
# (`python gpu_check/run.py --device cpu --quick`).
#
#   IMAGE_CHECK_DIR  where the rootfs and the record go (default .local/image-check, git-ignored)
#   SUITE, MIRROR    the Debian suite and mirror (default bookworm, http://deb.debian.org/debian)
#   STOP_AFTER       run only the first N steps (a partial rehearsal; the record says so)
# Record: $IMAGE_CHECK_DIR/image-check.json (each step, its exit code and seconds). On 2 busy cores the whole run
# takes about half an hour, most of it pip; a second run reuses the rootfs.
set -euo pipefail
cd "$(dirname "$0")/.."
dockerfile=infra/Dockerfile
out=${IMAGE_CHECK_DIR:-.local/image-check}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
rootfs=$out/rootfs
app=/home/ray/emoji-ldm

apt_packages() {  # the Dockerfile's apt packages, with Debian's chromium for the Chrome for Testing download
  sed -n '/apt-get install/,/&& base=/p' "$dockerfile" | sed 's/[\\]//g' | tr ' ' '\n' \
    | grep -E '^[a-z0-9][a-z0-9.+-]+$' | grep -vE '^(apt-get|install|base=.*)$' | sort -u
  printf '%s\n' chromium chromium-driver python3 python3-venv
}

copy_paths() {  # the sources of every COPY line, in order
  sed -n 's/^COPY \(--[^ ]* \)*\(.*\) [^ ]*$/\2/p' "$dockerfile" | tr ' ' '\n'
}

torch_pin() {
  grep -o 'torch==[0-9.]*' "$dockerfile" | head -n 1
}

if [ "${1:-}" = --plan ]; then
  echo "apt: $(apt_packages | tr '\n' ' ')"
  echo "copy: $(copy_paths | tr '\n' ' ')"
  echo "pip: $(torch_pin), then ., then --no-deps ."
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "image-check needs root (mmdebstrap, chroot): run it with sudo" >&2; exit 2; }
command -v mmdebstrap > /dev/null || apt-get install -y mmdebstrap || { apt-get update && apt-get install -y mmdebstrap; }

mkdir -p "$out"
steps=$out/steps.tsv
: > "$steps"
step() {  # step NAME COMMAND...: run, time and record one step; stop at the first failure
  local name=$1 start rc=0
  shift
  start=$(date +%s)
  echo "== $name"
  "$@" || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$steps"
  [ "$rc" = 0 ] || { record; echo "image-check: step '$name' failed ($rc)" >&2; exit 1; }
  if [ -n "${STOP_AFTER:-}" ] && [ "$(wc -l < "$steps")" -ge "$STOP_AFTER" ]; then
    record
    echo "image-check: stopped after $STOP_AFTER steps (STOP_AFTER); record in $out/image-check.json"
    exit 0
  fi
}
record() {  # the record: every step so far, as JSON
  python3 - "$steps" "$out/image-check.json" <<'PY'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [{"step": n, "rc": int(rc), "seconds": int(s)} for n, rc, s in rows]
json.dump({"passed": all(s["rc"] == 0 for s in steps), "complete": steps[-1]["step"].startswith("the GPU check"),
           "steps": steps}, open(sys.argv[2], "w"), indent=1)
PY
}

as_ray() {  # as_ray COMMAND: a shell command in the rootfs as the image's user, in the checkout, venv first, with
  # this machine's pip and TLS settings (its PIP_* variables, and the CA bundle mounted by `mounts`)
  local pass=()
  while IFS= read -r var; do pass+=("$var"); done < <(env | grep -E '^(PIP_[A-Z_]+|SSL_CERT_FILE|REQUESTS_CA_BUNDLE)=')
  chroot --userspec=1000:100 "$rootfs" /usr/bin/env -i HOME=/home/ray PATH=/home/ray/venv/bin:/usr/bin:/bin \
    EMOJI_LDM_CHROMIUM=/usr/bin/chromium EMOJI_LDM_CHROMEDRIVER=/usr/bin/chromedriver MALLOC_CONF=tcache:false \
    PYTHONUNBUFFERED=1 "${pass[@]}" /bin/sh -ec "cd $app && $1"
}

bootstrap() {
  [ -x "$rootfs/usr/bin/python3" ] && return 0
  # shellcheck disable=SC2046
  mmdebstrap --variant=apt --include="$(apt_packages | paste -sd, -)" "$suite" "$rootfs" "$mirror"
}

mounts() {  # the host's PyPI settings, wheel folders and CA bundle (pip reads them as on the host), DNS, /proc, /dev
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  if [ -f "${HOME:-/root}/.config/pip/pip.conf" ]; then  # the invoking user's pip settings become ray's
    mkdir -p "$rootfs/home/ray/.config/pip"
    cp "${HOME:-/root}/.config/pip/pip.conf" "$rootfs/home/ray/.config/pip/pip.conf"
  fi
  for path in /etc/pip.conf /etc/xdg/pip /etc/ssl/certs/ca-certificates.crt /opt/wheels /opt/pypi /opt/pypi-more; do
    [ -e "$path" ] || continue
    if [ -d "$path" ]; then mkdir -p "$rootfs$path"; else mkdir -p "$(dirname "$rootfs$path")"; touch "$rootfs$path"; fi
    mountpoint -q "$rootfs$path" || mount --bind -o ro "$path" "$rootfs$path"
  done
  mountpoint -q "$rootfs/proc" || mount -t proc proc "$rootfs/proc"
  mountpoint -q "$rootfs/dev" || mount --bind /dev "$rootfs/dev"
}
unmount() {
  for path in /dev /proc /opt/pypi-more /opt/pypi /opt/wheels /etc/ssl/certs/ca-certificates.crt /etc/xdg/pip \
      /etc/pip.conf; do
    mountpoint -q "$rootfs$path" && umount "$rootfs$path"
  done
  return 0
}
trap unmount EXIT

user_and_copy() {  # USER 1000:100 (ray:users) and the Dockerfile's COPY sources, without __pycache__
  chroot "$rootfs" /bin/sh -ec "getent passwd ray > /dev/null || useradd -u 1000 -g 100 -m -d /home/ray ray"
  rm -rf "${rootfs:?}$app" && mkdir -p "$rootfs$app/tests"
  copy_paths | while read -r path; do
    case "$path" in tests/*) cp "$path" "$rootfs$app/tests/" ;; *) cp -r "$path" "$rootfs$app/" ;; esac
  done
  find "$rootfs$app" -name __pycache__ -prune -exec rm -rf {} +
  chroot "$rootfs" chown -R 1000:100 /home/ray
}

step "debian rootfs ($suite) with the Dockerfile's apt packages" bootstrap
step "mounts" mounts
step "user ray 1000:100 and the COPY sources" user_and_copy
step "venv" as_ray "test -x /home/ray/venv/bin/python || python3 -m venv /home/ray/venv"
# the CPU wheel (+cpu) through the host's pip settings (download.pytorch.org is not reachable here), and the
# Dockerfile's check of its CUDA build (TORCH_CUDA is empty for the CPU image)
step "pip: $(torch_pin) (CPU)" as_ray "pip install --quiet $(torch_pin) && \
  python -c \"import torch; assert (torch.version.cuda or '') == '', torch.version.cuda\""
step "pip: the dependencies, then the code (--no-deps)" as_ray \
  "pip install --quiet . && pip uninstall -y --quiet emoji-ldm && pip install --quiet --no-deps ."
step "the build's checks: ray pin, emoji-ldm --version, cc" as_ray \
  "python -c 'import ray, emoji_ldm; print(ray.__version__)' && emoji-ldm --version && cc --version | head -n 1"
step "import ray, deepspeed" as_ray "DS_ACCELERATOR=cpu python -c 'import ray, deepspeed; print(deepspeed.__version__)'"
step "a tiny training step" as_ray "emoji-ldm train-step-check --preset tiny --steps 2 --warmup 1 --batch-size 4"
step "the GPU check's CPU mode" as_ray "python gpu_check/run.py --device cpu --quick --out /tmp/gpu-check.json"
record
echo "image-check: passed; record in $out/image-check.json"
