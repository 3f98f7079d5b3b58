"""ray_jobs/build_dataset.py runs as a Ray Job entrypoint would (joining the cluster)."""

import os
import subprocess
import sys

from deltalake import DeltaTable

from tests.conftest import REPO


def test_build_dataset_entrypoint(ray_local, tmp_path):
    out = tmp_path / "ds"
    r = subprocess.run(
        [sys.executable, str(REPO / "ray_jobs" / "build_dataset.py"), "--source", "twemoji", "--out", str(out),
         "--limit", "12"],
        env={**os.environ, "RAY_ADDRESS": ray_local}, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "build: 12 in" in r.stdout
    assert DeltaTable(str(out)).version() == 0

    r = subprocess.run([sys.executable, str(REPO / "ray_jobs" / "build_dataset.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--source" in r.stdout
