"""bench/RESULTS.md is what bench/render.py renders from the records, a page a reader scans in two minutes, and
every record on it comes from a maintained benchmark of bench/run.py."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_results_page_is_rendered_from_the_records_and_short():
    render = load("render")
    text = render.render(render.load(BENCH / "results"))
    assert (BENCH / "RESULTS.md").read_text() == text, "stale: run .venv/bin/python bench/render.py"
    assert text.count("\n") <= render.MAX_LINES == 120


def test_every_record_comes_from_a_maintained_benchmark_and_was_measured():
    """A row copied by hand is re-measured or dropped: no record on the page is a transcription."""
    writers = load("run").record_names()
    for path in sorted((BENCH / "results").glob("*.json")):
        record = json.loads(path.read_text())
        assert record["bench"] in writers, f"{path.name}: no benchmark of bench/run.py writes it"
        assert not record.get("transcribed"), f"{path.name}: copied by hand; rerun it or move it to bench/archive/"


def test_each_benchmark_of_the_runner_is_a_script_beside_it():
    for name, benchmark in load("run").BENCHMARKS.items():
        assert (BENCH / benchmark.script).is_file(), name
