"""Hub weights on our own storage: mirror Hugging Face models to a URI, and pull them into a pod's hub cache.

Input: hub model ids (downloaded once, or taken from a local hub cache). Output: the hub cache layout under a URI
(`URI/models--ORG--NAME/refs/REF` and `URI/models--ORG--NAME/snapshots/REVISION/FILE`, files, not links), which
`pull_weights` copies into a hub cache folder. With `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` (or `HF_HOME`) on that
folder, `from_pretrained("ORG/NAME")` loads from it and never asks the hub: the presets keep their hub ids.

    python -m emoji_ldm.store.mirror push s3://emoji-ldm/weights/hub stabilityai/sd-vae-ft-mse ...
    python -m emoji_ldm.store.mirror pull s3://emoji-ldm/weights/hub /home/ray/.cache/huggingface/hub
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError
from emoji_ldm.store.uri import filesystem

# the hub ids that the presets and the caption stage load (models/presets.py, caption/)
DEFAULT_MODELS = ("stabilityai/sd-vae-ft-mse", "openai/clip-vit-base-patch32", "Qwen/Qwen2.5-VL-3B-Instruct")


@dataclass(frozen=True)
class MirrorConfig:
    dest: str = opt(positional=True, help="where the mirror goes: s3://bucket/prefix (the pods pull "
                                          "s3://emoji-ldm/weights/hub) or a local folder")
    models: tuple[str, ...] = opt(DEFAULT_MODELS, flag="model", metavar="ORG/NAME",
                                  help="a hub model id to mirror (repeat; default: the presets' and the captioner's)")
    cache_dir: str | None = opt(None, help="the hub cache to take the models from (default: the hub's own)")
    offline: bool = opt(False, help="use only what that cache holds; never download")

    def __post_init__(self):
        if not self.models:
            raise UserError("no model to mirror: name hub ids such as stabilityai/sd-vae-ft-mse")
        for model in self.models:
            if model.count("/") != 1 or not all(model.split("/")):
                raise UserError(f"{model!r} is not a hub model id: use ORG/NAME "
                                "(for example openai/clip-vit-base-patch32)")


def _repo_folder(model: str) -> str:
    return "models--" + model.replace("/", "--")


def _copy_file(fs: pafs.FileSystem, source: Path, target: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):  # an object store has no folders (and a prefix-scoped user may not
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)  # check the bucket, which making one does)
    with source.open("rb") as src, fs.open_output_stream(target) as out:
        while chunk := src.read(8 << 20):
            out.write(chunk)


def mirror_weights(config: MirrorConfig) -> list[str]:
    """Download (or find in the cache) each model and copy its refs and snapshot files under `config.dest`.
    Returns the files written, relative to it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    fs, root = filesystem(config.dest)
    written = []
    for model in config.models:
        try:
            snapshot = Path(snapshot_download(model, cache_dir=config.cache_dir, local_files_only=config.offline))
        except LocalEntryNotFoundError:
            raise UserError(f"{model} is not in the hub cache {config.cache_dir or '(default)'}: download it once "
                            "(run this without --offline where the hub is reachable)") from None
        repo = snapshot.parent.parent  # .../models--ORG--NAME/snapshots/REVISION
        for path in sorted(p for p in [*(repo / "refs").rglob("*"), *snapshot.rglob("*")] if p.is_file()):
            relative = path.relative_to(repo.parent).as_posix()
            _copy_file(fs, path.resolve(), f"{root}/{relative}")  # resolve: snapshots link into blobs/
            written.append(relative)
    return written


def mirror_command(config: MirrorConfig) -> str:
    """`emoji-ldm weights mirror`: mirror_weights, as one line of text."""
    files = mirror_weights(config)
    return f"mirrored {len(config.models)} models ({len(files)} files) to {config.dest}"


def pull_weights(source: str, cache_dir: str) -> int:
    """Copy every file under `source` (what `mirror_weights` wrote) into the hub cache folder `cache_dir`; files
    already there with the same size are kept. Returns the number of files copied. An empty or missing source
    copies nothing: the pod then loads what its image or cache has."""
    fs, root = filesystem(source)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return 0
    copied = 0
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type != pafs.FileType.File:
            continue
        target = Path(cache_dir) / entry.path[len(root):].lstrip("/")
        if target.is_file() and target.stat().st_size == entry.size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        with fs.open_input_stream(entry.path) as src, partial.open("wb") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        partial.replace(target)  # a killed pull never leaves a short file under the final name
        copied += 1
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emoji_ldm.store.mirror", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="mirror hub models to a URI")
    push.add_argument("dest")
    push.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    push.add_argument("--cache-dir", default=None, help="the hub cache to take them from (default: the hub's)")
    push.add_argument("--offline", action="store_true", help="use only what the cache holds")
    pull = sub.add_parser("pull", help="copy a mirror into a hub cache folder")
    pull.add_argument("source")
    pull.add_argument("cache_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "push":
            print(mirror_command(MirrorConfig(args.dest, tuple(args.models), args.cache_dir, args.offline)))
        else:
            print(f"pulled {pull_weights(args.source, args.cache_dir)} files from {args.source} to {args.cache_dir}")
    except UserError as e:
        print(f"mirror: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
