"""The shipped train RayJob trains the way its preset states: the preset's engine, its compute-bound batch per GPU,
bf16 and a compiled UNet. Its entrypoint is parsed by the CLI into the `TrainConfig` a run would use."""

from __future__ import annotations

import shlex

from emoji_ldm.cli.commands import find, parse_config
from tests.k8s import K8S, load


def _train_config():
    (job,) = load(K8S / "base" / "rayjob.train.yaml")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["python", "ray_jobs/train.py"]
    return parse_config(find(("train",)), words[2:])


def test_the_train_rayjob_uses_the_presets_engine_batch_and_precision():
    config = _train_config()
    preset = config.resolved_preset()
    assert config.use_gpu and preset.name == "emoji64"
    assert config.zero_stage == preset.train.zero_stage == 0  # DDP: the 71M UNet fits one GPU
    micro = preset.train.batch_size // (config.workers * preset.train.grad_accum)
    assert micro == preset.train.gpu_micro_batch == 1024  # compute-bound; 128 is launch-bound
    assert config.speed.precision == "bf16" and config.speed.compile
