"""Comparing eval reports: only figures measured by one judge compare.

A judge is an instrument: emoji-FID in two judges' feature spaces, or prompt accuracy read by two judges, are
two measurements of different things. Every eval report carries its judge's content id (`report["judge"]
["content_id"]`); anything that sets two reports side by side (a RESULTS row, a before/after ratio) asks
`same_judge` first, and `ratio` does.
"""

from __future__ import annotations

from emoji_ldm.errors import UserError


def judge_id(report: dict, name: str = "report") -> str:
    """The content id of the judge that measured `report`; a UserError when it has none."""
    cid = (report.get("judge") or {}).get("content_id")
    if not cid:
        raise UserError(f"{name} has no judge content id (an eval report from before the frozen judge); measure "
                        "it again with `emoji-ldm eval`")
    return cid


def same_judge(**reports: dict) -> str:
    """The one judge content id of all `reports` (by name); a UserError naming each one's when they differ."""
    ids = {name: judge_id(r, name) for name, r in reports.items()}
    if len(set(ids.values())) > 1:
        listed = ", ".join(f"{name}: {cid}" for name, cid in ids.items())
        raise UserError(f"these eval reports were measured by different judges ({listed}); their figures do not "
                        "compare: evaluate both with the same judge (the frozen judge by default)")
    return next(iter(ids.values()))


def ratio(ours: dict, theirs: dict, key: str) -> float:
    """`ours[key] / theirs[key]` (e.g. "emoji_fid", "prompt_accuracy"), refused across two judges."""
    same_judge(ours=ours, theirs=theirs)
    if not theirs.get(key):
        raise UserError(f"cannot divide by {key} = {theirs.get(key)!r} of the other report")
    return ours[key] / theirs[key]
