"""The import graph of docs/architecture.md, enforced: `lint-imports` keeps the layer contracts of
pyproject.toml (imports inside functions included), and the CLI's command table, which names its stages as
strings that no import statement shows, is checked against the same layers."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import grimp
import pytest

from emoji_ldm.cli.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(pythonpath or cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def contracts() -> list[dict]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]["contracts"]


def layer_modules(layer: str) -> list[str]:
    return [m.strip() for part in layer.split("|") for m in part.split(":")]


def test_the_package_keeps_its_layer_contracts():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_package_of_the_house_is_in_a_layer():
    """A new package must be placed in the layers (and so in docs/architecture.md's table) to be checked."""
    graph = grimp.build_graph("emoji_ldm", cache_dir=None)
    top = {".".join(m.split(".")[:2]) for m in graph.modules if m.count(".") >= 1}
    layered = {m for c in contracts() if c["type"] == "layers" for layer in c["layers"] for m in layer_modules(layer)}
    assert top - layered == set()


def test_an_arrow_back_up_inside_a_function_breaks_the_contract(tmp_path):
    """The check sees lazy imports: a low layer importing a high one inside a function is refused."""
    pkg = tmp_path / "house"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    for path in (pkg / "__init__.py", pkg / "low" / "__init__.py", pkg / "high" / "__init__.py"):
        path.write_text("")
    (pkg / "high" / "top.py").write_text("import house.low.base\n")
    (pkg / "low" / "base.py").write_text("def f():\n    import house.high.top\n")
    (tmp_path / ".importlinter").write_text(textwrap.dedent("""\
        [importlinter]
        root_package = house
        [importlinter:contract:layers]
        name = layers
        type = layers
        layers =
            house.high
            house.low
        """))
    r = lint_imports(tmp_path)
    assert r.returncode == 1 and "house.low.base -> house.high.top" in r.stdout


def _table_graph() -> grimp.ImportGraph:
    """The package's graph plus one import from the command table to each module it names."""
    graph = grimp.build_graph("emoji_ldm", cache_dir=None)
    for command in COMMANDS:
        for ref in filter(None, (command.config, command.run, command.report)):
            module = ref.partition(":")[0]
            assert module in graph.modules, f"{command.name}: {ref} names no module of emoji_ldm"
            graph.add_import(importer="emoji_ldm.cli.commands", imported=module)
    return graph


@pytest.mark.parametrize("contract", [c for c in contracts() if c["type"] == "layers"], ids=lambda c: c["id"])
def test_the_command_table_keeps_the_layers(contract):
    """The table is the top of the house: what it names may sit anywhere below cli/, and nothing it names may
    reach back into cli/."""
    graph = _table_graph()
    for expression in contract.get("ignore_imports", []):
        importer, _, imported = (part.strip() for part in expression.partition("->"))
        graph.remove_import(importer=importer, imported=imported)
    layers = [grimp.Layer(*layer_modules(layer), independent="|" in layer) for layer in contract["layers"]]
    illegal = graph.find_illegal_dependencies_for_layers(layers=layers)
    assert [(d.importer, d.imported) for d in illegal] == []


def test_each_ray_job_entrypoint_says_the_stage_it_runs():
    """ray_jobs/: one thin script per submittable stage; its docstring's first line names the stage and the
    command, and it runs that command."""
    scripts = {c.script: c for c in COMMANDS if c.script}
    assert {p.name for p in (ROOT / "ray_jobs").glob("*.py")} == set(scripts)
    for name, command in scripts.items():
        text = (ROOT / "ray_jobs" / name).read_text()
        first = text.split('"""')[1].splitlines()[0]
        assert first.startswith(f"Ray Job entrypoint of the `{command.stage}` stage: `emoji-ldm {command.name}`"), name
        words = ", ".join(f'"{w}"' for w in command.words)
        assert f"main([{words}, *sys.argv[1:]])" in text, name


# The packages held to the import rule of docs/development.md; a package joins once its lazy imports follow it.
HELD_TO_THE_IMPORT_RULE = ("emoji_ldm/store", "emoji_ldm/cli", "emoji_ldm/errors.py")
ONE_PATH_ONLY = {"boto3", "botocore", "huggingface_hub"}  # heavy to import, and only S3 or the hub mirror needs them


def heavy_modules() -> set[str]:
    """The heavy libraries (ruff's banned module-level imports) and the project modules that import one at
    module level (their TID253 exceptions in pyproject.toml)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        lint = tomllib.load(f)["tool"]["ruff"]["lint"]
    libraries = set(lint["flake8-tidy-imports"]["banned-module-level-imports"]) | ONE_PATH_ONLY
    modules = {path.removesuffix(".py").replace("/", ".") for path, rules in lint["per-file-ignores"].items()
               if "TID253" in rules and "*" not in path}
    return libraries | modules


def lazy_imports(path: Path):
    """(line, module) of each import inside a function of `path`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    yield sub.lineno, sub.module
                elif isinstance(sub, ast.Import):
                    yield from ((sub.lineno, a.name) for a in sub.names)


def test_lazy_imports_are_only_of_heavy_modules():
    heavy = heavy_modules()
    files = [p for held in HELD_TO_THE_IMPORT_RULE for p in sorted((ROOT / held).rglob("*.py"))]
    wrong = [f"{p.relative_to(ROOT)}:{line}: {module}" for p in files for line, module in lazy_imports(p)
             if not any(module == h or module.startswith(h + ".") for h in heavy)]
    assert wrong == []
