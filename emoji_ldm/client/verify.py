"""`Client.verify`: C2PA provenance of an emoji file or of each image in a set's zip.

Locally with c2pa-python when it is installed (emoji_ldm.inference.provenance, imported only here and only
then: the client alone needs neither c2pa nor the model stack), else by the service's POST /v1/verify (the
file's bytes as the body, its media type as Content-Type)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import zipfile
from pathlib import Path

from emoji_ldm.client.errors import NotFoundError
from emoji_ldm.errors import UserError

MEDIA_TYPES = {".png": "image/png", ".gif": "image/gif", ".webp": "image/webp"}
SIDECAR_SUFFIX = ".c2pa"


def verify(transport, file: str | os.PathLike | bytes, remote: bool | None) -> dict:
    """A report ({"signed", "valid", "trusted", "status", "lineage", ...}) for one image, {name: report} for a
    zip's images; `remote` None: local when c2pa is installed, else the service."""
    name, data = ("file.png", bytes(file)) if isinstance(file, (bytes, bytearray)) else _read(Path(file))
    local = remote is not True and importlib.util.find_spec("c2pa") is not None
    if remote is False and not local:
        raise UserError("verify(remote=False): c2pa-python is not installed here: `pip install c2pa-python`, or "
                        "let the service verify (remote=None or True)")
    one = _local if local else (lambda n, d, sidecar: _remote(transport, n, d, sidecar))
    if data[:4] != b"PK\x03\x04":
        return one(name, data, _sidecar_beside(file))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = set(z.namelist())
        return {member: one(member, z.read(member), z.read(_sidecar(member)) if _sidecar(member) in names else None)
                for member in sorted(names) if Path(member).suffix.lower() in MEDIA_TYPES}


def _read(path: Path) -> tuple[str, bytes]:
    try:
        return path.name, path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r} to verify ({e.strerror}): give an emoji file or a set's "
                        "zip") from None


def _sidecar(name: str) -> str:
    return str(Path(name).with_suffix(SIDECAR_SUFFIX))


def _sidecar_beside(file) -> bytes | None:
    if isinstance(file, (bytes, bytearray)):
        return None
    beside = Path(file).with_suffix(SIDECAR_SUFFIX)
    return beside.read_bytes() if beside.is_file() and beside != Path(file) else None


def _local(name: str, data: bytes, sidecar: bytes | None) -> dict:
    from emoji_ldm.inference.provenance import verify as c2pa_verify

    return c2pa_verify(data, sidecar=sidecar, name=name)


def _remote(transport, name: str, data: bytes, sidecar: bytes | None = None) -> dict:
    """POST /v1/verify; a file whose manifest is a `.c2pa` sidecar sends it too (`X-C2PA-Sidecar`, base64)."""
    import base64

    media = MEDIA_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
    headers = {"Content-Type": media, **({"X-C2PA-Sidecar": base64.b64encode(sidecar).decode()} if sidecar else {})}
    try:
        answer = transport.request("POST", "/v1/verify", body=data, headers=headers)
    except NotFoundError as e:
        raise NotFoundError(f"this service has no /v1/verify ({e.message}): install c2pa-python to verify "
                            "locally", e.status, e.field, e.body) from None
    return json.loads(answer.data)
