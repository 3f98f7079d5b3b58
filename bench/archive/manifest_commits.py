"""Bulk's driver against the manifest's commits: its one part that grows with the prompts.

`emoji-ldm bulk`'s driver consumes the model actors' rows and commits the
manifest every --chunk-size images (`store.delta.append_rows`), so a job of
N prompts makes N / chunk commits; the rest of the driver (Ray Data's
iterator, one chunk of rows) does not grow with N. Running bulk itself at 1M
prompts takes ~6.5 hours on this 2-core box, so this measures the commit loop
alone, at the commit counts of each job size: a fresh process per size
appends chunks of MANIFEST_SCHEMA rows to a local table with the real
`append_rows`, and reports its peak private memory (RSS less shared pages,
as bench/scale_data.py) and commits/s.

Peer: the same appends through one DeltaTable kept open (`write_deltalake(table, ...)`),
whose snapshot holds every file's stats.

bulk commits each chunk as a Ray task on a fresh worker (max_calls=1), so no
process lives through more than one commit: "one commit, fresh process" is
the peak private memory of a new process that makes one more commit to the
table the loop left, i.e. what each commit costs at that job size.

    .venv/bin/python bench/manifest_commits.py [--prompts 100000,1000000] [--chunk-size 512]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile

from common import REPO, human, row, write_record

ROWS = r"""
import datetime as dt
import pyarrow as pa
from emoji_ldm.inference.bulk import MANIFEST_SCHEMA

now = dt.datetime.now(dt.timezone.utc)
def rows(c, chunk):  # one chunk as bulk commits it: a distinct prompt per row
    ids = [f"{c:08x}{i:08x}" for i in range(chunk)]
    return pa.Table.from_pylist([{
        "prompt_id": p, "prompt": f"a cat {p} in a hat", "index": 0, "seed": 7, "uri": f"s3://bucket/out/images/{p}-0.png",
        "width": 128, "height": 128, "png_bytes": 9000, "negative_prompt": "", "steps": 20, "guidance": 7.5,
        "scheduler": "ddim", "model": "s3://bucket/model", "generated_at": now, "name": f"cat_{p}",
        "alias": f":cat_{p}:", "target": "slack"} for p in ids], schema=MANIFEST_SCHEMA)
"""

CHILD = r"""
import json, sys, time
sys.path[:0] = [sys.argv[4], sys.argv[4] + "/bench"]
from common import private_mib
from deltalake import CommitProperties, DeltaTable, write_deltalake
from emoji_ldm.store.delta import META_KEY, append_rows
ROWS
commits, chunk, uri, _, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
metadata = {"operation": "bulk-generate", "counts": {"images": chunk},
            "config": {"model": "s3://bucket/model", "prompts": "s3://bucket/prompts.txt", "chunk_size": chunk}}

peak, table, start = 0.0, None, time.perf_counter()
for c in range(1, commits + 1):
    if how == "ours":
        append_rows(uri, rows(c, chunk), metadata)
    else:
        write_deltalake(table or uri, rows(c, chunk), mode="append",
                        commit_properties=CommitProperties(custom_metadata={META_KEY: metadata}))
        table = table or DeltaTable(uri)
    peak = max(peak, private_mib())
print(json.dumps({"commits": commits, "peak_mib": peak, "commits_per_s": commits / (time.perf_counter() - start)}))
""".replace("ROWS", ROWS)

ONE = r"""
import os, sys, time
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/bench"]
from common import TreeSampler
from emoji_ldm.store.delta import append_rows
ROWS

peak = []  # the process's private memory every 5 ms, in MiB
with TreeSampler(os.getpid(), lambda _, procs: peak.append(procs[0]["private"] / 2**20), interval=0.005):
    append_rows(sys.argv[1], rows(0, int(sys.argv[3])), {"operation": "bulk-generate"})
    time.sleep(0.05)
print(round(max(peak), 1))
""".replace("ROWS", ROWS)


def run(commits: int, chunk: int, how: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="emoji-ldm-manifest-") as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(commits), str(chunk), f"{tmp}/manifest", str(REPO), how],
                             capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        if how == "ours":
            one = subprocess.run([sys.executable, "-c", ONE, f"{tmp}/manifest", str(REPO), str(chunk)],
                                 capture_output=True, text=True, check=True).stdout
            result["one_commit_mib"] = float(one.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="100000,1000000", help="job sizes in prompts (1 image each)")
    parser.add_argument("--chunk-size", type=int, default=512, help="bulk's --chunk-size")
    parser.add_argument("--no-peer", action="store_true", help="ours only (the peer's 1M run takes ~8 minutes)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.prompts.split(",")]
    skipped = {"commits": 0, "peak_mib": float("nan"), "commits_per_s": float("nan")}
    results = {how: [run(math.ceil(n / args.chunk_size), args.chunk_size, how) if how == "ours" or not args.no_peer
                     else skipped for n in sizes] for how in ("ours", "peer")}
    print(f"bulk's manifest commits at --chunk-size {args.chunk_size}: peak private MiB of the committing process")
    print(f"{'prompts':>10} {'commits':>8} {'ours MiB':>9} {'peer MiB':>9} {'ours commits/s':>15} "
          f"{'peer commits/s':>15} {'one commit, fresh process MiB':>30}")
    for n, o, p in zip(sizes, results["ours"], results["peer"]):
        print(f"{n:>10,} {o['commits']:>8,} {o['peak_mib']:>9.1f} {p['peak_mib']:>9.1f} {o['commits_per_s']:>15.1f} "
              f"{p['commits_per_s']:>15.1f} {o['one_commit_mib']:>30.1f}")
    last = results["ours"][-1]
    for n, first in zip(sizes[:-1], results["ours"][:-1]):
        print(f"one commit in a fresh process: {sizes[-1]:,} / {n:,} prompts: "
              f"{last['one_commit_mib'] / first['one_commit_mib']:.2f}x")
    for how in ("ours", "peer"):
        last = results[how][-1]
        for n, first in zip(sizes[:-1], results[how][:-1]):
            print(f"{how}: {sizes[-1]:,} / {n:,} prompts: memory {last['peak_mib'] / first['peak_mib']:.2f}x, "
                  f"commits/s {last['commits_per_s'] / first['commits_per_s']:.2f}x")
    small, large = results["ours"][0], results["ours"][-1]
    span, area = f"{human(sizes[-1])} / {human(sizes[0])} prompts", "scale_data: bulk commits"
    rows = [row(area, f"one commit in a fresh process (as bulk commits), {span}", large["one_commit_mib"],
                small["one_commit_mib"], "MiB", "<= 1.25"),
            row(area, f"the commit loop in one process, {span}", large["peak_mib"], small["peak_mib"], "MiB")]
    if not args.no_peer:
        rows.append(row(area, "the commit loop: ours vs a DeltaTable kept open", large["peak_mib"],
                        results["peer"][-1]["peak_mib"], "MiB"))
    write_record("manifest_commits", {"chunk_size": args.chunk_size, "prompts": sizes, **results}, rows,
                 about=f"bulk's manifest commits alone, {args.chunk_size} rows each; the committer's peak memory.")


if __name__ == "__main__":
    main()
