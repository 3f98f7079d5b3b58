"""`emoji-ldm lineage`: from an emoji, a set, a model or a table back to the data and code that made it.

    emoji-ldm lineage TARGET [--json] [--commits N]
        TARGET: a PNG, an emoji set folder or its manifest.json, a model URI (or a training --out),
        a table URI[@VERSION] (a dataset, a latent table or a bulk manifest)
    emoji-ldm lineage --row ID DATASET[@VERSION] [--json]

Why one command: each stage already records where its output came from, but
in its own place; an audit or a takedown needs the whole chain in one step.
The chain follows what each link names, nothing is guessed:

    PNG text chunks (`emoji_ldm.inference.pngmeta`): prompt, seed, settings, model URI + content id
      -> model_card.json: content id, preset, training config, steps, final loss,
         latent table + version
      -> the latent table version's encode commit: VAE, text encoder, dataset URI + version
      -> the dataset version's commits that made its rows, oldest first: builds
         (source, crawl profile/tag/pages, counts), caption passes (captioner,
         model, prompt id), restores (and the commits a restore undid).

A set's manifest.json and a bulk manifest's commits name the model the same way.
When a link cannot be followed (a PNG with its metadata stripped, a deleted
model or table, a vacuumed version, a model replaced since: its content id
differs) the chain is printed up to there, then `missing link: <which>: <why>`.
Exit codes: 0 the chain is complete; 1 a link is missing; 2 the TARGET itself
is wrong (no such file, not a PNG/set/model/table, an unknown version, a row
that is not in the version).

URIs: what newer code records is absolute (local paths resolved when
written, S3 URIs without credentials). Older cards and commits stored paths
as typed; a relative one is resolved against the folder holding the record
and each folder above it (`store.uri.resolve_recorded`), and the latent
table's dataset comes from its encode commit's `source`, always absolute.

`--row ID`: where one row of a dataset version came from, for a takedown.
Nothing records a row's arrival directly; what is recorded is which commit
added each data file (the Delta log's add actions, one snapshot per version),
what each commit was (commitInfo), and the row's own columns (source,
source_url, caption, caption_model, caption_prompt_id). So:
  1. the row: the version's `id` column streams through Arrow (one narrow
     column, constant memory, stopping at the first file that has it); from
     that file only the row group holding it is read, without the image;
  2. the commit that added that file: a binary search over versions for the
     first snapshot whose add actions list it (O(log versions) snapshots,
     each O(files), never a row);
  3. a caption pass (or any commit that rewrites files) adds a new file for
     rows that were already there, so if the row is in one of the files that
     commit removed (read at the version before, those files only), it is
     followed there and the commit is listed as a rewrite; a restore is
     followed to the version it restored. The first commit whose file holds
     the row and before which it was nowhere is the version it arrived in:
     a build (or crawl) whose commit records the source.
Cost: one scan of the `id` column of the version asked for, then only the
files each rewrite replaced, and O(log versions) log snapshots per step.

Modules: `trace.py` (the chain: `trace`, `commit_summary`, `made_rows`),
`row.py` (`--row`: `row_origin`), `text.py` (the report: `format_chain`,
`format_row`); this one holds the command (`LineageConfig`,
`lineage_command`). The Delta-log reads they need are `emoji_ldm.store.log`
and `emoji_ldm.store.delta` (only `store/` imports `deltalake`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from emoji_ldm.errors import UserError
from emoji_ldm.lineage.row import row_origin
from emoji_ldm.lineage.text import format_chain, format_row
from emoji_ldm.lineage.trace import MissingLink, commit_summary, made_rows, trace
from emoji_ldm.options import opt

__all__ = ["LineageConfig", "MissingLink", "commit_summary", "format_chain", "format_row", "lineage_command",
           "made_rows", "row_origin", "trace"]


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
