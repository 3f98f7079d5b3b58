"""Artifacts (models, checkpoints, sample sheets, cards) under a local path or S3 URI.

Everything is written locally first and then copied, so a reader never sees a
half-written model folder: `upload_dir` copies files, then the `model_index.json`
or card last (readers look for it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
import zipfile
from pathlib import Path

import pyarrow.fs as pafs
from filelock import FileLock

from emoji_ldm.errors import UserError
from emoji_ldm.store.uri import check_s3_bucket, filesystem, is_s3, join, normalize_uri, s3_client

logger = logging.getLogger(__name__)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_writable(uri: str) -> str:
    """Fail early (before any training) when `uri` cannot be written."""
    uri = normalize_uri(uri)
    check_s3_bucket(uri)
    fs, path = filesystem(uri)
    probe = f"{path.rstrip('/')}/.write-probe"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise UserError(f"cannot write to {uri!r}: {e}") from None
    return uri


def upload_dir(local: str | Path, uri: str, last: tuple[str, ...] = ("model_index.json", "model_card.json")) -> None:
    """Copy a local folder to `uri` (local or S3); the files named in `last` are copied last."""
    local = Path(local)
    fs, path = filesystem(uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for f in files:
        target = f"{path.rstrip('/')}/{f.relative_to(local).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(f), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def write_bytes(uri: str, data: bytes, private: bool = False) -> None:
    """Write a whole file at once: a reader sees the old bytes or the new, never a part (an S3 PUT is atomic;
    a local file is written beside its name and renamed onto it, keeping the old file's permissions).
    `private`: a new local file only its owner can read (0600)."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    folder, name = path.rsplit("/", 1)
    part = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with fs.open_output_stream(part) as f:
            f.write(data)
        if os.path.exists(path):
            os.chmod(part, os.stat(path).st_mode & 0o7777)
        elif private:
            os.chmod(part, 0o600)
        fs.move(part, path)
    finally:
        delete(part)


def delete(uri: str) -> None:
    """Remove one file (no error when it is already gone)."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def read_bytes(uri: str) -> bytes:
    """A whole file, one version of it. On S3 that is one GET: pyarrow's stream asks the size first and then
    reads by ranges, so a file rewritten in between (a job's state.json) came back cut or mixed."""
    if is_s3(uri):
        return _read_s3_object(normalize_uri(uri))
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{uri!r} does not exist") from None


def _read_s3_object(uri: str) -> bytes:
    import botocore.exceptions as bce

    bucket, _, key = uri[len("s3://"):].partition("/")
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except bce.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise UserError(f"{uri!r} does not exist") from None
        raise OSError(f"reading {uri!r}: {e}") from None
    except bce.BotoCoreError as e:
        raise OSError(f"reading {uri!r}: {e}") from None


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def local_copy(uri: str) -> str:
    """A local folder with the contents of `uri`: the path itself, or a copy of an S3 folder in this node's cache.

    Many processes of one node load the same model at once (training ranks, Serve replicas, bulk and encode
    actors). The copy is downloaded once: under a file lock, into a temporary folder renamed into place, and
    reused while the remote files are unchanged (the cache key holds their names, sizes and times); a folder in
    the cache is complete by construction and is never deleted while another process may be loading it.
    """
    uri = normalize_uri(uri)
    if not is_s3(uri):
        if not Path(uri).exists():
            raise UserError(f"{uri!r} does not exist")
        return uri
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{uri!r} does not exist")
    listing = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    version = hashlib.sha1(json.dumps(sorted((i.path, i.size, str(i.mtime)) for i in listing)).encode()).hexdigest()
    cache = Path(os.environ.get("EMOJI_LDM_CACHE", Path(tempfile.gettempdir()) / "emoji-ldm-cache"))
    target = cache / f"{hashlib.sha1(uri.encode()).hexdigest()[:16]}-{version[:12]}"
    if target.exists():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.exists():  # another process did not finish it while this one waited
            logger.info("downloading %s to %s", uri, target)
            tmp = Path(tempfile.mkdtemp(dir=cache))  # same filesystem as the target: the rename is atomic
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            tmp.rename(target)
    return str(target)


def artifact_uri(out: str, *parts: str) -> str:
    return join(normalize_uri(out), *parts)


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_content_id(folder: str | Path) -> str:
    """`sha256:<hex>` of a model folder's weight files (`*.safetensors`, `*.bin`), each with its path.

    Computed once at export and stored in the model card (PNGs and sets name
    their model by it): equal weights in the same layout give the same id,
    any changed tensor or swapped component another. Configs and tokenizer
    files are left out on purpose: they record paths and library versions,
    which would change the id of the same weights exported elsewhere.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise UserError(f"{str(folder)!r} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}): not a model folder")
    total = hashlib.sha256()
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        total.update(path.relative_to(folder).as_posix().encode() + b"\0" + digest.digest())
    return "sha256:" + total.hexdigest()


def write_zip(uri: str, files: dict[str, bytes], folder: str) -> None:
    """The set's zip written entry by entry into the storage's output stream (an S3 multipart upload, or a
    local part file renamed onto its name at the end), never whole in memory; as /v1/emoji-sets zips it: every
    file under `folder/`, PNGs stored, JSON deflated."""
    fs, path = filesystem(uri)
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    target = path if is_s3(uri) else f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with fs.open_output_stream(target) as out, zipfile.ZipFile(out, "w") as zf:
            for entry, data in files.items():
                method = zipfile.ZIP_DEFLATED if entry.endswith(".json") else zipfile.ZIP_STORED
                zf.writestr(f"{folder}/{entry}", data, compress_type=method)
        if target != path:
            fs.move(target, path)
    finally:
        if target != path:
            try:
                fs.delete_file(target)
            except (FileNotFoundError, OSError):
                pass
