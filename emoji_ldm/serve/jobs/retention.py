"""Retention: job folders and stored sets older than the retention period are deleted.

    <jobs_uri>/<key id>/<job id>/...   a job: deleted when its newest object is older than the period and it
                                       is not running (no marker under <jobs_uri>/_active/)
    <sets_uri>/<set id>/...            a stored set: deleted when its newest object is older than the period

The listing is streamed (S3 `list_objects_v2` one page of 1000 at a time; a local tree with `os.scandir`), in
key order, so the objects of one job or set come together: only the current one's names are held, never the
bucket's. Only names shaped like the service's own are deleted (`JOB_GROUP`, `SET_GROUP`): a folder of any other
name under the sets or jobs location is left alone, and `check_locations` refuses to start a service whose sets or
jobs location holds, or sits inside, a model, a judge, an adapter, the key file or the other one.
An ingress runs it when it starts and then at most every `EVERY_S` (serve/job_routes.py's sweep).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator

logger = logging.getLogger("ray.serve")

EVERY_S = 3600.0
# only what the service itself names is ever deleted: <key id or _local>/<job id>/... and <set id>/...
JOB_GROUP = re.compile(r"(key-[0-9a-f]{16}|_local)/job-[0-9a-z-]{8,40}")
SET_GROUP = re.compile(r"set-[0-9]{8}-[0-9]{6}-[0-9a-f]{8}")


def iter_objects(uri: str) -> Iterator[tuple[str, float]]:
    """(relative name, modification time in epoch seconds) of every object under `uri`, in name order, one
    listing page at a time."""
    for name, mtime, _ in iter_sized(uri):
        yield name, mtime


def iter_sized(uri: str) -> Iterator[tuple[str, float, int]]:
    """`iter_objects` with each object's size in bytes."""
    from emoji_ldm.store.uri import is_s3, normalize_uri

    if is_s3(uri):
        from emoji_ldm.store.uri import s3_client

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                       PaginationConfig={"PageSize": 1000})
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][len(prefix):], obj["LastModified"].timestamp(), obj["Size"]
        return
    root = normalize_uri(uri)

    def walk(folder: str, rel: str) -> Iterator[tuple[str, float, int]]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)  # one folder's names at a time
        except FileNotFoundError:
            return
        for entry in entries:
            name = f"{rel}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                yield from walk(entry.path, name + "/")
            elif entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                yield name, info.st_mtime, info.st_size

    yield from walk(root, "")


def _groups(uri: str, depth: int) -> Iterator[tuple[str, list[str], float]]:
    """(group, its objects' names, its newest time): a group is the first `depth` parts of a name."""
    current, names, newest = None, [], 0.0
    for name, mtime in iter_objects(uri):
        parts = name.split("/")
        if len(parts) <= depth:
            continue  # a loose file beside the groups: not ours to judge
        group = "/".join(parts[:depth])
        if group != current:
            if current is not None:
                yield current, names, newest
            current, names, newest = group, [], 0.0
        names.append(name)
        newest = max(newest, mtime)
    if current is not None:
        yield current, names, newest


def _delete(uri: str, names: list[str]) -> None:
    from emoji_ldm.store.uri import is_s3, join, normalize_uri

    if is_s3(uri):
        from emoji_ldm.store.uri import s3_client

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        for i in range(0, len(names), 1000):
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": prefix + n} for n in
                                                                          names[i:i + 1000]], "Quiet": True})
        return
    root = normalize_uri(uri)
    folders = set()
    for name in names:
        try:
            os.remove(os.path.join(root, name))
        except FileNotFoundError:
            pass
        folders.add(os.path.dirname(join(root, name)))
    for folder in sorted(folders, key=len, reverse=True):  # empty folders go too, deepest first
        while folder.startswith(root.rstrip("/") + "/") and folder.rstrip("/") != root.rstrip("/"):
            try:
                os.rmdir(folder)
            except OSError:
                break
            folder = os.path.dirname(folder)


def expire_jobs(jobs_uri: str, days: float, now: float | None = None) -> int:
    """Delete every job folder whose newest object is older than `days` and which is not running; returns
    how many."""
    from emoji_ldm.serve.jobs.store import active_marker
    from emoji_ldm.store.artifacts import exists

    cutoff = (now or time.time()) - days * 86400
    gone = 0
    for group, names, newest in _groups(jobs_uri, 2):
        owner, job_id = group.split("/")
        if not JOB_GROUP.fullmatch(group) or newest >= cutoff or exists(active_marker(jobs_uri, owner, job_id)):
            continue  # not shaped like a job of ours (the _active markers, an operator's files), recent, or running
        _delete(jobs_uri, names)
        gone += 1
        logger.info("retention: deleted job %s of %s (%d files, past %g days)", job_id, owner, len(names), days)
    return gone


def expire_sets(sets_uri: str, days: float, now: float | None = None) -> int:
    """Delete every stored set whose newest object is older than `days`; returns how many."""
    cutoff = (now or time.time()) - days * 86400
    gone = 0
    for group, names, newest in _groups(sets_uri, 1):
        if newest < cutoff and SET_GROUP.fullmatch(group):  # a model or a dataset beside the sets is never ours
            _delete(sets_uri, names)
            gone += 1
            logger.info("retention: deleted set %s (%d files, past %g days)", group, len(names), days)
    return gone


def check_locations(sets_uri: str, jobs_uri: str, others: dict[str, str]) -> None:
    """UserError when the sets or jobs location contains, or is inside, one of `others` (name -> URI: the model,
    the judge, the adapters, the key file) or each other: retention deletes under them, so nothing else may be
    there. Local paths are compared resolved (a symlink is what it points to)."""
    from emoji_ldm.errors import UserError

    ours = {name: uri for name, uri in (("sets_uri", sets_uri), ("jobs_uri", jobs_uri)) if uri}
    places = {name: _place(uri) for name, uri in {**others, **ours}.items() if uri}
    for name, uri in ours.items():
        for other, there in places.items():
            here = places[name]
            if other == name or None in (here, there):
                continue
            if here == there or there.startswith(here + "/") or here.startswith(there + "/"):
                raise UserError(f"args.{name} {uri!r} overlaps {other} {(others | ours)[other]!r}: retention deletes "
                                f"expired output under {name}, so give it a folder of its own that holds nothing "
                                "else and is inside nothing the service reads (e.g. s3://bucket/emoji-ldm/sets)")


def _place(uri: str) -> str | None:
    """A comparable form of `uri` (None: not a location, such as a hub name)."""
    from emoji_ldm.store.uri import is_s3, normalize_uri

    try:
        where = normalize_uri(uri)
    except Exception:  # not a path or an s3:// URI: nothing retention could reach
        return None
    if is_s3(where):
        return "s3://" + where.split("://", 1)[1].rstrip("/")
    return os.path.realpath(where.removeprefix("file://")).rstrip("/") or "/"
