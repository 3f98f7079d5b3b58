"""store/ turns a missing table or version into a UserError, and nothing else: a bug keeps its traceback."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from emoji_ldm.errors import UserError
from emoji_ldm.store import delta, log


@pytest.fixture
def table_with_cleaned_log(tmp_path):
    """A local table of versions 0..3 whose log before the checkpoint at 3 is gone, as log clean-up leaves it."""
    uri = str(tmp_path / "t")
    for i in range(4):
        write_deltalake(uri, pa.table({"id": [str(i)]}), mode="append")
    DeltaTable(uri).create_checkpoint()
    for v in (0, 1):
        os.remove(f"{uri}/_delta_log/{v:020d}.json")
    return uri


def test_a_version_whose_log_is_gone_is_a_user_error(table_with_cleaned_log):
    with pytest.raises(UserError, match="version 0 of .* cannot be loaded"):
        delta.open_table(f"{table_with_cleaned_log}@0")
    assert delta.open_table(f"{table_with_cleaned_log}@3").version() == 3
    assert log.table_at(table_with_cleaned_log, 0) is None
    assert log.table_at(table_with_cleaned_log, 3).version() == 3


def test_a_bug_while_loading_a_version_is_not_a_user_error(table_with_cleaned_log, monkeypatch):
    def broken(self, version):
        raise TypeError("a bug")

    monkeypatch.setattr(delta.Table, "load_as_version", broken)
    with pytest.raises(TypeError, match="a bug"):
        delta.open_table(f"{table_with_cleaned_log}@3")


def test_a_bug_while_opening_a_version_for_lineage_is_not_a_missing_version(table_with_cleaned_log, monkeypatch):
    class Broken(delta.Table):
        def __init__(self, *args, **kwargs):
            raise TypeError("a bug")

    monkeypatch.setattr(log, "Table", Broken)
    with pytest.raises(TypeError, match="a bug"):
        log.table_at(table_with_cleaned_log, 3)
