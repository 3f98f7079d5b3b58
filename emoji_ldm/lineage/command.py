"""`emoji-ldm lineage`: from an emoji, a set, a model or a table back to the data and code that made it.

    emoji-ldm lineage TARGET [--json] [--commits N]
    emoji-ldm lineage --row ID DATASET[@VERSION] [--json]

Exit codes: 0 the chain is complete; 1 a link is missing; 2 the TARGET itself is wrong. How the chain is
followed, and what `--row` reads, is in docs/lineage.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.lineage.row import row_origin
from emoji_ldm.lineage.text import format_chain, format_row
from emoji_ldm.lineage.trace import trace


@dataclass(frozen=True)
class LineageConfig:
    target: str = opt(positional=True, help="a PNG, an emoji set folder or its manifest.json, a model URI "
                                            "(or a training --out), or a table URI[@VERSION]; with --row, "
                                            "the dataset URI[@VERSION]")
    row: str | None = opt(None, help="a row id (the `id` column, a content hash): the version it arrived in, "
                                     "its source, captioner and caption")
    as_json: bool = opt(False, flag="json", help="print one JSON document instead of text")
    commits: int = opt(1000, help="list at most N commits of the dataset version (the newest N up to it)")

    def __post_init__(self):
        if self.commits < 1:
            raise UserError(f"--commits must be 1 or more, got {self.commits}")
        if self.row is not None and not self.row.strip():
            raise UserError("--row is empty: give a row id (the `id` column of the dataset)")


def lineage_command(config: LineageConfig) -> int:
    """Print the lineage (text or --json); the exit code: 0 complete, 1 a missing link (2 is a UserError)."""
    if config.row is not None:
        result = row_origin(config.target, config.row.strip())
        print(json.dumps(result, indent=2, default=str) if config.as_json else format_row(result))
        return 0
    result = trace(config.target, commits=config.commits)
    print(json.dumps(result, indent=2, default=str) if config.as_json else format_chain(result))
    return 0 if result["complete"] else 1
