"""`make image-check` (infra/image_check.sh) rehearses the Dockerfile's own steps: its plan names every apt package
and COPY source of infra/Dockerfile and the same torch pin, so the rehearsal cannot drift from the image."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO
from tests.unit.test_cluster_blockers import DOCKERFILE, apt_packages

SCRIPT = REPO / "infra" / "image_check.sh"


def plan() -> dict[str, list[str]]:
    r = subprocess.run([str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return {k: v.split() for k, v in (line.split(": ", 1) for line in r.stdout.splitlines())}


def test_image_check_follows_the_dockerfile():
    steps = plan()
    text = DOCKERFILE.read_text()
    assert apt_packages(text) <= set(steps["apt"]), apt_packages(text) - set(steps["apt"])
    copied = [w for m in re.finditer(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M) for w in m.group(1).split()]
    assert steps["copy"] == copied
    assert steps["pip"][0] == re.search(r"torch==[0-9.]+", text).group(0) + ","
    # the smoke test inside: what the issue asks of the image
    script = SCRIPT.read_text()
    for command in ("emoji-ldm --version", "import ray, deepspeed", "train-step-check --preset tiny",
                    "gpu_check/run.py --device cpu --quick", "--userspec=1000:100"):
        assert command in script, command
