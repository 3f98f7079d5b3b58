"""`emoji-ldm lineage --row ID DATASET[@VERSION]`: where one row of a dataset version came from.

The method and its cost are in the package docstring (`emoji_ldm.lineage`); the Delta-log reads
(which files a version holds, which commit added a file, finding the row) are `emoji_ldm.store.log`.
"""

from __future__ import annotations

import datetime as dt

from emoji_ldm.errors import UserError
from emoji_ldm.lineage.trace import commit_summary

ROW_COLUMNS = ("id", "source", "source_url", "page_url", "title", "tag", "caption", "caption_model",
               "caption_prompt_id", "ingested_at", "width", "height")


class _Log:
    """Commit summaries by version, each read from its own commit file when first asked for."""

    def __init__(self, uri: str):
        self.uri, self.rows = uri, {}

    def commit(self, version: int) -> dict:
        from emoji_ldm.store.delta import history

        if version not in self.rows:
            self.rows.update({r["version"]: r for r in history(self.uri, limit=1, upto=version)})
        row = self.rows.get(version)
        return commit_summary(row) if row else {"version": version, "operation": "?",
                                                "note": "the log no longer holds this commit"}


def row_origin(dataset: str, row_id: str) -> dict:
    """Where row `row_id` of a dataset version came from: the version it arrived in (with its commit), the
    commits that rewrote its file since (caption passes, restores), and its source and caption columns."""
    from emoji_ldm.store.delta import open_table
    from emoji_ldm.store.log import find_row, has_file, removed_files, table_at, version_added
    from emoji_ldm.store.uri import DatasetRef, public_uri

    ref = DatasetRef.parse(dataset)
    table = open_table(ref)
    version = table.version()
    found = find_row(table, row_id, ROW_COLUMNS)
    if found is None:
        raise UserError(f"row {row_id!r} is not in {ref.uri}@{version}: give a row id (the `id` column, a content "
                        "hash) of that version, e.g. from `emoji-ldm dataset diff`")
    path, row = found
    current, seen = path, row  # the file at the version asked for; the row as the current step sees it
    log = _Log(ref.uri)
    changes, at, note = [], version, None
    while True:
        added, gone = version_added(ref.uri, path, at)
        commit = log.commit(added)
        restored = commit.get("restored_version")
        older = table_at(ref.uri, restored if restored is not None else added - 1) if added > 0 else None
        if gone or (added > 0 and older is None):
            note = "older versions can no longer be loaded (vacuumed or log cleaned): it may have arrived earlier"
        if older is None:
            break
        if restored is not None and has_file(older, path):  # the restore brought this very file back
            changes.append(commit)
            at = restored
            continue
        only = None if restored is not None else removed_files(older, table_at(ref.uri, added))
        before = find_row(older, row_id, ROW_COLUMNS, only) if only is None or only else None
        if before is None:  # nowhere before this commit: it arrived here
            break
        changes.append({**commit, "caption_changed": before[1].get("caption") != seen.get("caption")})
        (path, seen), at = before, older.version()
    row = {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}
    for key in ("source", "source_url", "page_url"):
        if row.get(key):
            row[key] = public_uri(row[key])
    caption_pass = next((c for c in changes if c.get("caption_changed")), None)  # the newest that set it
    return {"row": row_id, "dataset": ref.uri, "version": version, "file": current, "arrived": commit,
            "rewritten_by": changes, "caption_pass": caption_pass, "values": row, "note": note}
