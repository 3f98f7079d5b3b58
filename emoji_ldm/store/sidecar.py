"""What a Delta table keeps beside its log, under `_emoji_ldm/`: tags (Delta has none; they create no
version), the image mode of its rows, and each build's rejected inputs (`rejects/build-<id>/`, Parquet)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from emoji_ldm.errors import UserError
from emoji_ldm.store.uri import filesystem, is_s3, join, normalize_uri

SIDECAR = "_emoji_ldm"


# --- tags -------------------------------------------------------------------


def _tags_path(uri: str) -> str:
    return join(normalize_uri(uri), SIDECAR, "tags.json")


def read_tags(uri: str) -> dict[str, int]:
    fs, path = filesystem(_tags_path(uri))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return {}


def check_tag_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "_.-" for c in name) or name.isdigit():
        raise UserError(
            f"tag name {name!r} must be letters, digits, '_', '.' or '-' and not only digits"
        )


def write_tag(uri: str, name: str, version: int) -> None:
    """Point tag `name` at `version`, which the caller has checked exists (`ops.tag` opens it): the tags are
    read by `delta.open_table`, so this module does not import it."""
    check_tag_name(name)
    tags = read_tags(uri)
    tags[name] = version
    fs, path = filesystem(_tags_path(uri))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(tags, indent=2, sort_keys=True).encode())


# --- image mode -------------------------------------------------------------
# Delta's table properties admit only Delta's own keys, so the mode lives beside the table, written once by
# the build that creates it.

IMAGE_MODES = ("RGBA", "RGB")


def _mode_path(uri: str) -> str:
    return join(normalize_uri(uri), SIDECAR, "image_mode")


def image_mode(uri: str) -> str:
    """The mode of the images the table at `uri` stores: "RGBA", or "RGB" (built with --background)."""
    fs, path = filesystem(_mode_path(uri))
    try:
        with fs.open_input_stream(path) as f:
            mode = f.read().decode().strip()
    except FileNotFoundError:
        mode = None
    if mode not in IMAGE_MODES:
        raise UserError(f"{uri} has no image mode record ({SIDECAR}/image_mode, RGBA or RGB), which "
                        "`emoji-ldm dataset build` writes when it creates a dataset: build the dataset with it")
    return mode


def record_image_mode(uri: str, mode: str) -> None:
    """Record the image mode of a table about to be created (its first build calls this before committing)."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode must be one of {IMAGE_MODES}, got {mode!r}")
    fs, path = filesystem(_mode_path(uri))
    if not is_s3(uri):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(mode.encode())


# --- rejects ----------------------------------------------------------------

REJECT_SCHEMA = pa.schema(
    [("source_url", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)


def rejects_uri(uri: str, build_id: str) -> str:
    """The folder of a build's rejected inputs: one Parquet file per write task."""
    return join(normalize_uri(uri), SIDECAR, "rejects", f"build-{build_id}")


def read_rejects(uri: str, build_id: str) -> pa.Table:
    """A build's rejected inputs (for tests and small builds: it reads them all)."""
    fs, path = filesystem(rejects_uri(uri, build_id))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return REJECT_SCHEMA.empty_table()
    return pds.dataset(path, filesystem=fs, format="parquet", schema=REJECT_SCHEMA).to_table()
