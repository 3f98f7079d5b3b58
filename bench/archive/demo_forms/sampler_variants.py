"""The naming sheet of one model under sampler variants (dynamic thresholding, guidance, seed, steps), e.g.

    python bench/archive/demo_forms/sampler_variants.py demo-out/run/model /tmp/variants \\
        '[{"name": "g5"}, {"name": "g2.5", "g": 2.5}, {"name": "dyn", "thr": 1.5, "ratio": 0.95}]'
"""
import json
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from diffusers import DPMSolverMultistepScheduler
from emoji_ldm.eval.naming import naming_sheet, options_only
from emoji_ldm.inference.images import image_grid
from emoji_ldm.inference.sampler import InferenceOptions, SampleJob, Sampler

model, out = sys.argv[1], Path(sys.argv[2])
variants = json.loads(sys.argv[3])  # [{"name":..., "thr": null|1.0|1.5, "g": 5.0, "seed": 0}]
tiles = naming_sheet()
sampler = Sampler.load(model, device="cpu", options=InferenceOptions(dtype="auto"))
base = sampler._schedulers["dpmpp"].config
out.mkdir(parents=True, exist_ok=True)
for v in variants:
    kw = {} if v.get("thr") is None else {"thresholding": True, "sample_max_value": v["thr"],
                                          "dynamic_thresholding_ratio": v.get("ratio", 0.995)}
    sampler._schedulers["dpmpp"] = DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", **kw)
    seed = v.get("seed", 0)
    job = SampleJob(tuple(t["answer"] for t in tiles), (seed,) * len(tiles), steps=v.get("steps", 25), guidance=v.get("g", 5.0))
    images = sampler.sample([job])[0]
    d = out / v["name"]; d.mkdir(exist_ok=True)
    image_grid(images, [str(t["tile"]) for t in tiles], columns=6).save(d / "naming-sheet.png")
    (d / "naming-options.json").write_text(json.dumps(options_only(tiles), indent=1))
    (d / "naming-key.json").write_text(json.dumps({"model": model, "seed": seed, "steps": v.get("steps", 25),
                                                   "guidance": v.get("g", 5.0), "variant": v, "tiles": tiles}, indent=1))
    print(d)
