"""`emoji-ldm lineage`: from an emoji, a set, a model or a table back to the data and code that made it.

    emoji-ldm lineage TARGET [--json] [--commits N]
    emoji-ldm lineage --row ID DATASET[@VERSION] [--json]

An emoji file (PNG, APNG, GIF, WebP) is verified first: its C2PA manifest, or its `.c2pa` sidecar
(`provenance_cmd.verify_target`): the signer and the validation status. Exit codes: 0 the chain is complete
(and a signed file's signature holds); 1 a link is missing, or a signed file fails verification, or a GIF or
WebP carries no manifest (it has no other record to follow); 2 the TARGET itself is wrong. How the chain is
followed, and what `--row` reads, is in docs/lineage.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.lineage.provenance_cmd import format_provenance, verify_target
from emoji_ldm.lineage.row import row_origin
from emoji_ldm.lineage.text import format_chain, format_row
from emoji_ldm.lineage.trace import trace

SIGNED_SUFFIXES = (".png", ".gif", ".webp")  # what `generate` and the sets write (an APNG is a .png)


@dataclass(frozen=True)
class LineageConfig:
    target: str = opt(positional=True, help="an emoji (PNG, APNG, GIF, WebP: its C2PA manifest is verified first), "
                                            "an emoji set folder or its manifest.json, a model URI (or a training "
                                            "--out), or a table URI[@VERSION]; with --row, the dataset URI[@VERSION]")
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
    provenance = _provenance(config.target.strip())
    if provenance is not None and not config.target.strip().lower().endswith(".png"):  # a GIF or WebP: no chunks
        print(json.dumps(provenance, indent=2, default=str) if config.as_json else format_provenance(provenance))
        return 0 if provenance["valid"] else 1
    result = trace(config.target, commits=config.commits)
    if provenance is not None:
        result["provenance"] = provenance
    text = format_chain(result) if provenance is None else f"{format_provenance(provenance)}\n{format_chain(result)}"
    print(json.dumps(result, indent=2, default=str) if config.as_json else text)
    broken = provenance is not None and provenance["signed"] and not provenance["valid"]
    return 0 if result["complete"] and not broken else 1


def _provenance(target: str) -> dict | None:
    """The C2PA verification of an emoji file (None for other targets); an unsigned PNG is still traced."""
    from emoji_ldm.store.artifacts import exists
    from emoji_ldm.store.uri import normalize_uri

    if not target.lower().endswith(SIGNED_SUFFIXES):
        return None
    uri = normalize_uri(target)
    if not exists(uri):
        raise UserError(f"no file at {uri!r}: give the path or s3:// URI of an emoji (PNG, GIF or WebP)")
    return verify_target(uri)
