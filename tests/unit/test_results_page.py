"""bench/RESULTS.md is what bench/render.py renders from the records, and a page a reader scans in two minutes."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_results_page_is_rendered_from_the_records_and_short():
    spec = importlib.util.spec_from_file_location("render", ROOT / "bench" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    text = render.render(render.load(ROOT / "bench" / "results"))
    assert (ROOT / "bench" / "RESULTS.md").read_text() == text, "stale: run .venv/bin/python bench/render.py"
    assert text.count("\n") <= render.MAX_LINES == 300
