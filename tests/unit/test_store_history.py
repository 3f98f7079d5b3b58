"""Commit history read by version: a version's own commit file, however many commits came after it."""

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.transaction import CommitProperties

from emoji_ldm.store.delta import META_KEY, commit_metadata, history


def _table(tmp_path, versions: int) -> str:
    uri = str(tmp_path / "t")
    for v in range(versions):
        write_deltalake(uri, pa.table({"id": [str(v)]}), mode="append",
                        commit_properties=CommitProperties(custom_metadata={META_KEY: {"message": f"commit {v}"}}))
    return uri


def test_the_commits_up_to_a_version_whatever_came_after(tmp_path):
    uri = _table(tmp_path, 6)
    rows = history(uri, limit=2, upto=3)
    assert [r["version"] for r in rows] == [2, 3] and [r["message"] for r in rows] == ["commit 2", "commit 3"]
    assert [r["version"] for r in history(uri, limit=2)] == [4, 5]  # the newest, as before
    assert [r["rows_added"] for r in history(uri, upto=1)] == [1, 1]  # limit None: from version 0
    assert commit_metadata(DeltaTable(uri, version=2))["message"] == "commit 2"


def test_a_commit_the_log_no_longer_holds_is_left_out(tmp_path):
    uri = _table(tmp_path, 3)
    (tmp_path / "t" / "_delta_log" / f"{0:020d}.json").unlink()  # as log retention removes old commits
    assert [r["version"] for r in history(uri, limit=3, upto=2)] == [1, 2]
