"""The maintained benchmarks behind one runner: each measures ours against a peer in the same run and writes a
record to bench/results/, from which bench/render.py draws bench/RESULTS.md.

    .venv/bin/python bench/run.py --list              # the benchmarks, what each measures
    .venv/bin/python bench/run.py NAME [FLAGS...]     # run one (its own --help lists its flags)

Studies run once to decide a design, one-off scripts and older records are in bench/archive/ (not linted, not
tested); bench/common.py is what the benchmarks share.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    script: str  # beside this file
    measures: str
    records: tuple[str, ...] = ()  # the `bench` names of its records, when not the benchmark's own name


BENCHMARKS: dict[str, Benchmark] = {
    "ingest": Benchmark("ingest.py", "dataset build: images/s over loopback HTTP against img2dataset"),
    "crawl": Benchmark("crawl.py", "crawl: pages/s on a local site against the seed's sequential crawler"),
    "caption": Benchmark("caption.py", "dataset caption: rows/s, batched Qwen2.5-VL against one call per row"),
    "train": Benchmark("train.py", "training and sampling images/s against a plain diffusers loop"),
    "fast-path": Benchmark("fast_path.py", "bf16 and torch.compile against fp32 and eager, training and sampling"),
    "scale-train": Benchmark("scale_train.py", "train: peak memory and images/s at 5k, 50k and 500k rows"),
    "scale-data": Benchmark("scale_data.py", "build, caption, encode, train, bulk: peak memory and rows/s at N, 10N"),
    "quality": Benchmark("quality.py", "a training recipe against another, same steps and seed, measured offline"),
    "dreambooth": Benchmark("dreambooth.py", "DreamBooth (full and LoRA) against the plain way"),
    "serve": Benchmark("serve.py", "Ray Serve images/s under load against a one-request-at-a-time server"),
    "animation": Benchmark("animation.py", "an animated loop's frames/s against stills; the noise circle's motion"),
    "submit": Benchmark("submit.py", "emoji-ldm submit against Ray's own ray job submit"),
    "security": Benchmark("security.py", "refusals (401/429/400) and the atomic quota check against /healthz"),
    "make-times": Benchmark("make_times.py", "make test and make demo on a fresh clone: wall time",
                            ("make_test", "make_demo")),
    "demo-quality": Benchmark("demo_quality.py", "the demo model before and after a recipe change: eval, wall time",
                              ("demo_quality",)),
    "naming": Benchmark("naming.py", "the blind naming test: a reader names a model's 24 tiles (chance: 6)"),
    "gpu-check": Benchmark("gpu_check.py", "a make gpu-check report (run on the GPU machine) as a record",
                           ("gpu_check",)),
}


def record_names() -> dict[str, str]:
    """A record's `bench` name -> the benchmark that writes it."""
    names = {}
    for name, benchmark in BENCHMARKS.items():
        for record in benchmark.records or (Path(benchmark.script).stem,):
            names[record] = name
    return names


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__ if not argv or argv[0] != "--list" else "")
        for name, benchmark in BENCHMARKS.items():
            print(f"  {name:14} {benchmark.measures}")
        return 0
    benchmark = BENCHMARKS.get(argv[0])
    if benchmark is None:
        print(f"bench/run.py: no benchmark {argv[0]!r}: `bench/run.py --list` names them", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, str(HERE / benchmark.script), *argv[1:]]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
