"""Emoji sets: the files of one themed set (PNGs, a sheet, manifest.json), zipped or stored.

A set's items share one seed, so they start from the same initial noise and
differ only by their prompt: that is what makes a set look like one family.
With an upload target (`inference.targets`: slack, discord, github) every PNG
is sized and checked for that platform and named `<name>.png`, the name that
bulk uploaders take for the emoji's; the manifest lists each item's `name` and
`alias` (`:name:`) either way.
"""

from __future__ import annotations

import io
import re
import secrets
import time
import zipfile

from emoji_ldm.version import code_version

SHEET = "sheet.png"      # the contact sheet, beside the items' PNGs in a set's folder and zip
MANIFEST = "manifest.json"
# names an item may not take: an item named "sheet" would be sheet.png and overwrite the contact sheet (its name
# becomes sheet_2, as any second item of one name does)
RESERVED_NAMES = frozenset(name.rsplit(".", 1)[0] for name in (SHEET, MANIFEST))
LINEAGE_KEYS = ("content_id", "dataset", "dataset_version", "latent_table", "latent_table_version", "code_version",
                "preset")


def new_set_id() -> str:
    """Server-generated, sortable by time, never chosen by a client: `set-20261122-101500-9f2c4a1b`."""
    return time.strftime("set-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(4)


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "item"


def lineage(card: dict) -> dict:
    """The model card's lineage: what data and code the model came from."""
    return {k: card[k] for k in LINEAGE_KEYS if k in card}


def set_manifest(set_id: str, theme: str, items: list[str], prompts: list[str], settings: dict, card: dict,
                 model_uri: str, target: str = "raw") -> dict:
    from emoji_ldm.inference.targets import emoji_name, get_target

    spec = get_target(target)
    taken: set[str] = set(RESERVED_NAMES)
    names = [emoji_name(prompt, taken) for prompt in prompts]
    files = [f"{i:03d}-{slug(item)}.png" if spec.size is None else f"{name}.png"
             for i, (item, name) in enumerate(zip(items, names))]
    return {
        "id": set_id,
        "theme": theme,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": {"name": spec.name, "size": spec.size, "max_bytes": spec.max_bytes},
        "items": [{"index": i, "item": item, "prompt": prompt, "file": f, "name": name, "alias": f":{name}:",
                   "seed": settings["seed"]}
                  for i, (item, prompt, f, name) in enumerate(zip(items, prompts, files, names))],
        "settings": settings,
        "model": {"uri": model_uri, **lineage(card)},
        "server_code_version": code_version(),
    }


def set_files(manifest: dict, pngs: list[bytes], params: list[dict] | None = None) -> dict[str, bytes]:
    """File name -> bytes: one PNG per item (fitted to the manifest's target), sheet.png (all items with
    labels, and as text chunks what the items' `params` share, when given), manifest.json."""
    import json

    from PIL import Image

    from emoji_ldm.inference.pngmeta import shared_params
    from emoji_ldm.inference.sampler import image_grid, png_bytes
    from emoji_ldm.inference.targets import fit, get_target

    target = get_target((manifest.get("target") or {}).get("name", "raw"))
    pngs = [fit(png, target) for png in pngs]
    pairs = [(item["file"], png) for item, png in zip(manifest["items"], pngs)]
    files = dict(pairs)
    clash = {SHEET, MANIFEST} & set(files)
    if clash or len(files) != len(pairs):
        raise ValueError(f"the set's item files {sorted(clash) or 'repeat a name'}: every item needs its own file, "
                         f"apart from {SHEET} and {MANIFEST}")
    images = [Image.open(io.BytesIO(png)) for png in pngs]
    sheet = image_grid(images, [item["item"] for item in manifest["items"]])
    files[SHEET] = png_bytes(sheet, shared_params(params) if params else None)
    files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    return files


def zip_bytes(files: dict[str, bytes], folder: str) -> bytes:
    """A zip with every file under `folder/` (PNGs are already compressed: stored, not deflated)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            method = zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED
            zf.writestr(f"{folder}/{name}", data, compress_type=method)
    return buf.getvalue()


def store_set(sets_uri: str, set_id: str, files: dict[str, bytes]) -> dict[str, str]:
    """Write the files under `sets_uri/set_id/` (local or S3), manifest.json last; returns name -> URI."""
    from emoji_ldm.store.artifacts import write_bytes
    from emoji_ldm.store.uri import join

    folder = join(sets_uri, set_id)
    uris = {}
    for name in sorted(files, key=lambda n: n == MANIFEST):  # readers look for the manifest
        uris[name] = join(folder, name)
        write_bytes(uris[name], files[name])
    return uris
