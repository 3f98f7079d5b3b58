"""A process that reads a Delta table through store/ exits cleanly (exit 0), every time.

With deltalake 1.6 and pyarrow 26, a short script that read a table through
`DeltaTable.to_pyarrow_dataset()` / `to_pyarrow_table()` (deltalake's default
Python `PyFileSystem`) printed its result and then often aborted at interpreter
exit: "terminate called without an active exception" (exit 134), sometimes a
segfault or a hang in Arrow's thread-pool shutdown. `store.delta.Table` and
`store.delta.arrow_dataset` read through a native Arrow filesystem instead (the
why is in `Table`'s docstring). The race is timing-dependent, so each process
does the reads that raced (a whole column, `head`, a scan stopped early) and
exits with a stream left open, reads of other files still in flight; it runs
10 times.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import write_deltalake

RUNS = 10
LIMIT_S = 240  # a run takes seconds; on a loaded 2-core machine up to a minute
FILES, ROWS = 8, 500_000  # ~5 MB of ids per file: a stream left open at exit has reads of several files in flight

READ = """
import sys

from emoji_ldm.store.delta import arrow_dataset, open_table
from emoji_ldm.store.log import find_row

uri = sys.argv[1]
table = open_table(uri)
print(open_table(uri).to_pyarrow_table(columns=["x"]).num_rows)  # one column, whole (deltalake's own read)
print(arrow_dataset(table).head(3, columns=["id"]).num_rows)     # a few rows, the rest left unread
print(find_row(table, "id-5-9", ["id", "x"])[1]["x"])            # a scan stopped early, then one row group
batches = arrow_dataset(uri).scanner(columns=["id"]).scan_batches()
print(next(batches).record_batch.num_rows > 0)                  # a stream left open at exit
"""


def _table(uri: str) -> None:
    for f in range(FILES):  # one data file per append
        ids = pc.binary_join_element_wise(pa.array([f"id-{f}-"] * ROWS), pc.cast(pa.array(range(ROWS)), pa.string()),
                                          "")
        write_deltalake(uri, pa.table({"id": ids, "x": pa.array(range(ROWS))}), mode="append")


def _run(uri: str) -> tuple[object, str, str]:
    """(exit code or "timeout", stdout, stderr) of one fresh process running READ."""
    try:
        r = subprocess.run([sys.executable, "-c", READ, uri], capture_output=True, text=True, timeout=LIMIT_S)
        return r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:  # the hang variant: Arrow's pool waiting on a thread Python ended
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return "timeout", "", f"no exit after {LIMIT_S} s\n{err}"


@pytest.mark.slow  # 4M rows and 10 processes: about a minute, so `make test` runs it and `make test-fast` does not
def test_reads_through_store_exit_cleanly(tmp_path):
    uri = str(tmp_path / "table")
    _table(uri)
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = list(pool.map(lambda _: _run(uri), range(RUNS)))
    expected = f"{FILES * ROWS}\n3\n9\nTrue\n"
    bad = [r for r in runs if r[0] != 0 or r[1] != expected]
    assert not bad, (f"{len(bad)} of {RUNS} processes did not exit cleanly (exit codes {[r[0] for r in bad]}); "
                     f"the first: stdout {bad[0][1]!r}, stderr:\n{bad[0][2]}")


def test_store_datasets_hold_no_python_filesystem(tmp_path):
    """The property the fix rests on, checked directly: no read helper of store/ hands Arrow a Python filesystem."""
    import pyarrow.fs as pafs

    from emoji_ldm.store.delta import arrow_dataset, open_table
    from emoji_ldm.store.log import table_at

    uri = str(tmp_path / "small")
    write_deltalake(uri, pa.table({"id": ["a", "b"], "x": [1, 2]}))
    write_deltalake(uri, pa.table({"id": ["c"], "x": [3]}), mode="append")
    for data in (arrow_dataset(uri), arrow_dataset(f"{uri}@0"), open_table(uri).to_pyarrow_dataset(),
                 table_at(uri, 0).to_pyarrow_dataset()):
        assert not isinstance(data.filesystem, pafs.PyFileSystem)
        assert all(not isinstance(f.filesystem, pafs.PyFileSystem) for f in data.get_fragments())
    assert arrow_dataset(uri).count_rows() == 3 and arrow_dataset(f"{uri}@0").count_rows() == 2
