"""`emoji-ldm serve` on a laptop starts its own Ray with Ray's token authentication (runtime/connect.py,
`ensure_ray(private=True)`), even where RAY_AUTH_MODE says disabled (as this test session's does): another
process that reaches its GCS without the token, or with another one, is refused; the token is on no disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

SERVE_RAY = r"""
import json, os, sys, ray
from emoji_ldm.runtime.connect import ensure_ray

ensure_ray(num_cpus=1, private=True)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "mode": os.environ.get("RAY_AUTH_MODE")}), flush=True)
sys.stdin.readline()  # held up until the test has tried to join
ray.shutdown()
"""

JOIN = r"""
import sys, ray
try:
    ray.init(address=sys.argv[1])
    print("JOINED")
except Exception as e:
    print("REFUSED", type(e).__name__)
"""


def test_serves_own_ray_refuses_a_process_without_its_token():
    with tempfile.TemporaryDirectory(prefix="emoji-ldm-private-ray-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        env.update(HOME=home, RAY_AUTH_MODE="disabled", RAY_TMPDIR=home)
        serve = subprocess.Popen([sys.executable, "-c", SERVE_RAY], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = serve.stdout.readline()
            assert line, serve.stderr.read()[-3000:]
            started = json.loads(line)
            assert started["mode"] == "token"
            for auth in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
                joined = subprocess.run([sys.executable, "-c", JOIN, started["gcs"]], env={**env, **auth},
                                        capture_output=True, text=True, timeout=300)
                said = joined.stdout + joined.stderr[-2000:]
                assert "REFUSED" in joined.stdout and "JOINED" not in joined.stdout, said
            assert not os.path.exists(os.path.join(home, ".ray", "auth_token"))  # held in the environment only
        finally:
            serve.stdin.write("\n")
            serve.stdin.flush()
            serve.wait(timeout=120)
