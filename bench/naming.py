"""The blind naming test of a model (`emoji_ldm.eval.naming`): draw its sheet, then score a reader's answers.

    python bench/naming.py draw --model demo-out/run --out naming/      # naming-sheet.png, naming-options.json,
                                                                         # naming-key.json (keep it from the reader)
    python bench/naming.py score --key naming/naming-key.json --answers answers.json [--record]

`draw`: one image per tile, the 24 names typed as a user types them (the model card's prompt style gives them the
form of its captions), seed 0, the Sampler's defaults (25 DPM-Solver++ steps, the model's own guidance). The reader
gets the sheet and the options only, and answers [{"tile": 1, "choice": "...", "recognised": true|false}, ...].
`score --record` writes bench/results/naming-*.json with the model, the commit and the date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from emoji_ldm.eval.naming import naming_sheet, options_only, score  # noqa: E402


def draw(model: str, out: Path, steps: int, guidance: float | None) -> None:
    from emoji_ldm.inference.sampler import InferenceOptions, Sampler

    sampler = Sampler.load(model, device="cpu", options=InferenceOptions(dtype="auto"))
    write_sheet(sampler, out, {"model": model, "seed": 0, "steps": steps, "guidance": guidance})
    print(f"{out / 'naming-sheet.png'} (give the reader it and naming-options.json, not naming-key.json)")


def write_sheet(sampler, out: Path, key: dict, scheduler: str | None = "dpmpp") -> None:
    """The sheet `sampler` draws at `key`'s seed, steps and guidance (None: the model's own; `scheduler` None: the
    pipeline's current one), into OUT: naming-sheet.png, naming-options.json and naming-key.json (`key`, with the
    guidance drawn at, and the tiles)."""
    from emoji_ldm.inference.images import image_grid
    from emoji_ldm.inference.sampler import SampleJob

    tiles = naming_sheet()
    job = sampler.resolve(SampleJob(tuple(t["answer"] for t in tiles), (key["seed"],) * len(tiles),
                                    steps=key["steps"], guidance=key["guidance"], scheduler=scheduler))
    images = sampler.sample([job])[0]
    out.mkdir(parents=True, exist_ok=True)
    image_grid(images, [str(t["tile"]) for t in tiles], columns=6).save(out / "naming-sheet.png")
    (out / "naming-options.json").write_text(json.dumps(options_only(tiles), indent=1))
    (out / "naming-key.json").write_text(json.dumps({**key, "guidance": job.guidance, "tiles": tiles}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("draw")
    d.add_argument("--model", required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--steps", type=int, default=25)
    d.add_argument("--guidance", type=float, default=None, help="default: the model's own (its model card)")
    s = sub.add_parser("score")
    s.add_argument("--key", type=Path, required=True)
    s.add_argument("--answers", type=Path, required=True)
    s.add_argument("--record", action="store_true", help="write the figures to bench/results/")
    s.add_argument("--label", default=None, help="the model's name in the record's rows (default: its path)")
    args = parser.parse_args(argv)
    if args.command == "draw":
        draw(args.model, args.out, args.steps, args.guidance)
        return 0
    key = json.loads(args.key.read_text())
    figures = score(key["tiles"], json.loads(args.answers.read_text()))
    print(f"named {figures['named']} of {figures['tiles']} (chance {figures['chance']:.0f}), recognised "
          f"{figures['recognised']}: {', '.join(figures['recognised_tiles'])}")
    if args.record:
        from common import row, write_record

        summary = [row("blind naming", f"tiles named of {figures['tiles']} (chance {figures['chance']:.0f}), "
                       f"{args.label or key['model']}", figures["named"], goal=">= 20"),
                   row("blind naming", f"tiles truly recognised, {args.label or key['model']}", figures["recognised"],
                       goal=">= 12")]
        write_record("naming", {"model": key["model"], "steps": key["steps"], "guidance": key["guidance"],
                                **figures}, summary, about="blind naming test: a reader who had not seen the prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
