"""Datasets on S3, served by a real moto_server process on 127.0.0.1."""

import pytest
from deltalake import DeltaTable

from emoji_ldm.errors import UserError
from emoji_ldm.ingest.build import BuildConfig, build_dataset
from emoji_ldm.store import ops
from emoji_ldm.store.delta import open_table
from emoji_ldm.store.sidecar import read_rejects
from emoji_ldm.store.uri import storage_options
from tests.conftest import make_bad_corpus, png_bytes, run_cli, start_moto, stop_moto
from tests.fixtures.ray_nodes import own_head


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.client().create_bucket(Bucket="emoji-data")
    return "s3://emoji-data"


def test_build_every_source_into_s3(s3_server, ray_local, bucket, tmp_path, http_site):
    uri = f"{bucket}/datasets/mixed"
    s1 = build_dataset(BuildConfig(source="twemoji", out=uri, limit=40, message="twemoji"))
    assert s1.version == 0

    folder = tmp_path / "pack"
    expected = make_bad_corpus(folder)
    s2 = build_dataset(BuildConfig(source=f"dir:{folder}", out=uri))
    assert s2.version == 1 and s2.added == sum(1 for r in expected.values() if r is None)
    rejects = read_rejects(uri, open_table(uri).history(1)[0]["emoji_ldm"]["build_id"])
    assert rejects.num_rows == sum(1 for r in expected.values() if r)

    for i in range(3):
        http_site.files[f"/u{i}.png"] = png_bytes((0, 80 * i, 0, 255), (16, 16 + i))
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(http_site.url(f"u{i}.png") for i in range(3)) + "\n" + http_site.url("status/404") + "\n")
    s3 = build_dataset(BuildConfig(source=f"urls:{lst}", out=uri))
    assert s3.version == 2 and s3.added == 3 and s3.rejected == {"http_error": 1}

    dt = DeltaTable(uri, storage_options=storage_options())
    assert dt.version() == 2
    sources = set(dt.to_pyarrow_table(columns=["source"]).column("source").to_pylist())
    assert sources == {"twemoji", f"dir:{folder.resolve()}", f"urls:{lst.resolve()}"}
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="emoji-data")["Contents"]]
    assert any(k.startswith("datasets/mixed/_delta_log/") for k in keys)

    # Read back a version, diff, tag, restore.
    assert open_table(f"{uri}@0").to_pyarrow_table(columns=["id"]).num_rows == s1.added
    d = ops.diff(uri, "0", "2")
    assert d.added == s2.added + s3.added and not d.removed
    ops.tag(uri, "twemoji-only", 0)
    assert ops.show(f"{uri}@twemoji-only").rows == s1.added
    assert ops.restore(uri, 0) == 3
    assert open_table(uri).to_pyarrow_table(columns=["id"]).num_rows == s1.added
    assert [v["operation"] for v in ops.versions(uri)] == ["build", "build", "build", "restore"]


def test_s3_errors_are_clear(s3_server, ray_local, bucket, cli_in_process):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        build_dataset(BuildConfig(source="twemoji", out="s3://no-such-bucket/x", limit=3))
    code, err = cli_in_process("dataset", "build", "--source", "twemoji", "--out", "s3://no-such-bucket/x",
                               "--limit", "3")
    assert code == 2 and "does not exist" in err
    with pytest.raises(UserError, match="no dataset at 's3://emoji-data/absent'"):
        open_table(f"{bucket}/absent")


def test_unreachable_endpoint(s3_server, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match="cannot reach the S3 endpoint"):
        build_dataset(BuildConfig(source="twemoji", out="s3://emoji-data/x", limit=3))


def test_wrong_credentials(tmp_path):
    """A moto_server that enforces IAM auth from its first request refuses unknown keys."""
    server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = {**server.env(), "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG", "AWS_SECRET_ACCESS_KEY": "wrong"}
        r = run_cli("dataset", "build", "--source", "twemoji", "--out", "s3://emoji-data/x", "--limit", "3", env=env)
        assert r.returncode == 2, r.stderr
        assert "S3 refused access to bucket 'emoji-data'" in r.stderr and "AWS_ACCESS_KEY_ID" in r.stderr
    finally:
        stop_moto(server)


def test_concurrent_appends_through_the_cli_lose_no_commit(s3_server, ray_local, bucket):
    """3 `dataset build` processes appending at once into one S3 table (the table exists first):
    Delta's optimistic concurrency lands every commit, no row is lost. The three are drivers of one cluster of
    the test's own, as three Ray Jobs on one RayCluster would be, with 6 CPUs: on the session's 2-CPU head they
    would starve each other's shuffle aggregators (each Ray Data job reserves up to a quarter of the CPUs for
    them). Three local Rays, one per process, starting at once timed out on a busy 2-core machine."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    uri = f"{bucket}/datasets/concurrent"
    first = build_dataset(BuildConfig(source="synthetic:5:100", out=uri))
    assert first.version == 0
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cli = str(Path(sys.executable).parent / "emoji-ldm")
    with own_head(env, num_cpus=6, prefix="rayca-") as (address, _):
        procs = [subprocess.Popen([cli, "dataset", "build", "--source", f"synthetic:6:{w}0", "--out", uri],
                                  env={**env, "RAY_ADDRESS": address}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for w in range(1, 4)]
        results = [(p.wait(600), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-2000:]
    table = DeltaTable(uri, storage_options=storage_options())
    assert table.version() == 3  # 1 + 3 commits, none lost
    assert table.to_pyarrow_table(columns=["id"]).num_rows == 5 + 3 * 6  # distinct seeds: distinct images
    assert [v["operation"] for v in ops.versions(uri, limit=100)] == ["build"] * 4
