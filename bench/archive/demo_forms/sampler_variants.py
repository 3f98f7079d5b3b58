"""The naming sheet of one model under sampler variants (dynamic thresholding, guidance, seed, steps), e.g.

    python bench/archive/demo_forms/sampler_variants.py demo-out/run/model /tmp/variants \\
        '[{"name": "g5"}, {"name": "g2.5", "g": 2.5}, {"name": "dyn", "thr": 1.5, "ratio": 0.95}]'

Each variant's DPM-Solver++ is set as the pipeline's scheduler, and `bench/naming.py`'s `write_sheet` draws with it.
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from diffusers import DPMSolverMultistepScheduler  # noqa: E402
from naming import write_sheet  # noqa: E402

from emoji_ldm.inference.sampler import InferenceOptions, Sampler  # noqa: E402

model, out = sys.argv[1], Path(sys.argv[2])
variants = json.loads(sys.argv[3])  # [{"name": ..., "thr": None | 1.0 | 1.5, "ratio": 0.995, "g": 5.0, "seed": 0}]
sampler = Sampler.load(model, device="cpu", options=InferenceOptions(dtype="auto"))
config = sampler.pipe.scheduler.config  # the model's DPM-Solver++ (load_pipeline's default)
for v in variants:
    thresholding = {} if v.get("thr") is None else {"thresholding": True, "sample_max_value": v["thr"],
                                                    "dynamic_thresholding_ratio": v.get("ratio", 0.995)}
    sampler.pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                                     **thresholding)
    key = {"model": model, "seed": v.get("seed", 0), "steps": v.get("steps", 25), "guidance": v.get("g", 5.0),
           "variant": v}
    write_sheet(sampler, out / v["name"], key, scheduler=None)
    print(out / v["name"])
