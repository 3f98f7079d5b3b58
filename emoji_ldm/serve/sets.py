"""Emoji sets: the files of one themed set (PNGs, a sheet, manifest.json), zipped or stored.

A set's items share one seed, so they start from the same initial noise and
differ only by their prompt: that is what makes a set look like one family.
With an upload target (`inference.targets`: slack, discord, github) every PNG
is sized and checked for that platform and named `<name>.png`, the name that
bulk uploaders take for the emoji's; the manifest lists each item's `name` and
`alias` (`:name:`) either way.
"""

from __future__ import annotations

import functools
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
                 model_uri: str, target: str = "raw", animation=None, quality: dict | None = None) -> dict:
    """The set's manifest; `animation` (`AnimationSettings`, animated): every item a loop, named .png (APNG),
    .gif or .webp, and the manifest's `animation` says how the loops were drawn; `quality` (`draw_set`): the
    set's legibility, consistency and redraws, and each item's seed and legibility."""
    from dataclasses import asdict

    from emoji_ldm.inference.animation import EXTENSIONS, LOOP_PATH
    from emoji_ldm.inference.settings import model_guidance
    from emoji_ldm.inference.targets import emoji_name, get_target

    spec = get_target(target)
    taken: set[str] = set(RESERVED_NAMES)
    names = [emoji_name(prompt, taken) for prompt in prompts]
    animated = animation is not None and animation.animated
    ext = EXTENSIONS[animation.format] if animated else ".png"
    files = [f"{i:03d}-{slug(item)}{ext}" if spec.size is None else f"{name}{ext}"
             for i, (item, name) in enumerate(zip(items, names))]
    quality = dict(quality or {})
    seeds = quality.pop("seeds", None) or [settings["seed"]] * len(items)
    shares = (quality.get("legibility") or {}).get("items") if isinstance(quality.get("legibility"), dict) else None
    manifest = {
        "id": set_id,
        "theme": theme,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": {"name": spec.name, "size": spec.size, "max_bytes": spec.max_bytes},
        "items": [{"index": i, "item": item, "prompt": prompt, "file": f, "name": name, "alias": f":{name}:",
                   "seed": seeds[i]}
                  for i, (item, prompt, f, name) in enumerate(zip(items, prompts, files, names))],
        # the guidance it was drawn at: the request's, or the model's own when it set none
        "settings": {**settings, "guidance": model_guidance(card) if settings.get("guidance") is None
                     else settings["guidance"]},
        "animation": {**asdict(animation), "path": LOOP_PATH} if animated else None,
        "model": {"uri": model_uri, **lineage(card)},
        "server_code_version": code_version(),
    }
    if quality:
        manifest["quality"] = quality
        for item, share in zip(manifest["items"], shares or ()):
            item["legibility"] = share
    return manifest


def set_files(manifest: dict, pngs: list[bytes], params: list[dict] | None = None) -> dict[str, bytes]:
    """File name -> bytes: one PNG per item (fitted to the manifest's target), sheet.png (all items with
    labels, and as text chunks what the items' `params` share, when given), manifest.json."""
    import json

    from PIL import Image

    from emoji_ldm.inference.images import image_grid, png_bytes, sheet_thumbnail
    from emoji_ldm.inference.pngmeta import shared_params
    from emoji_ldm.inference.provenance import SigningKeys, sign_set_files
    from emoji_ldm.inference.targets import fit, get_target

    target = get_target((manifest.get("target") or {}).get("name", "raw"))
    if manifest.get("animation"):
        pngs, stills = fitted_loops(manifest, pngs, target, params)
    else:
        pngs = [fit(png, target) for png in pngs]
        stills = [sheet_thumbnail(Image.open(io.BytesIO(png))) for png in pngs]  # one decoded image at a time
    pairs = [(item["file"], png) for item, png in zip(manifest["items"], pngs)]
    files = dict(pairs)
    clash = {SHEET, MANIFEST} & set(files)
    if clash or len(files) != len(pairs):
        raise ValueError(f"the set's item files {sorted(clash) or 'repeat a name'}: every item needs its own file, "
                         f"apart from {SHEET} and {MANIFEST}")
    sheet = image_grid(stills, [item["item"] for item in manifest["items"]])
    files[SHEET] = png_bytes(sheet, shared_params(params) if params else None)
    files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    # with the operator's C2PA keys: every item and the sheet signed, manifest.json's `provenance` says so
    return sign_set_files(files, manifest, params, SigningKeys.from_env(), target, SHEET, MANIFEST)


def fitted_loops(manifest: dict, drawn: list[bytes], target, params: list[dict] | None = None):
    """Each item's drawn loop (`animation.drawn_loop`) as the manifest's format under the target's cap, its
    record (what fitting kept, the loop's metrics) put on the manifest's item: (files, first frames). A loop
    that cannot fit is a 422 naming `animation`."""
    from emoji_ldm.errors import UserError
    from emoji_ldm.inference.animation import AnimationSettings, fitted_loop, read_frames
    from emoji_ldm.inference.images import sheet_thumbnail
    from emoji_ldm.serve.errors import ApiError

    spec = manifest["animation"]
    settings = AnimationSettings(spec["frames"], spec["format"], spec["motion"], spec["fps"], spec["matte"])
    files, stills = [], []
    for i, (item, data) in enumerate(zip(manifest["items"], drawn)):
        try:
            file, record = fitted_loop(data, settings, target, params[i] if params else None)
        except UserError as e:
            raise ApiError(422, f"animation: item {item['item']!r}: {e}", "animation") from None
        item.update(file_record=record["file"], metrics=record["metrics"])
        files.append(file)
        stills.append(sheet_thumbnail(read_frames(data)[0]))
    return files, stills


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


# ---- /v1/generate's files: sized for a target, or animated loops -------------------------------------------------

MEDIA_TYPES = {"apng": "image/apng", "gif": "image/gif", "webp": "image/webp"}


def finish_files(made: list[tuple[bytes, dict]], body, metadata: bool = True) -> list[tuple[bytes, dict]]:
    """The Generator's images as /v1/generate answers them: a still PNG sized for `body.target`; an animated loop
    (`animation.drawn_loop`) as `body.animation`'s format under the target's cap, its record (loop, what fitting
    kept, metrics) under its parameters' `animation`. A loop that cannot fit is a 422 naming `animation`."""
    from emoji_ldm.errors import UserError
    from emoji_ldm.inference.animation import fitted_loop
    from emoji_ldm.inference.targets import fit, get_target
    from emoji_ldm.serve.errors import ApiError
    from emoji_ldm.serve.signing import signed_outputs

    target, animation = get_target(body.target), body.animation.settings()
    if not animation.animated:
        return signed_outputs([(fit(png, target), params) for png, params in made], target)
    out = []
    for drawn, params in made:
        try:
            file, record = fitted_loop(drawn, animation, target, params if metadata else None)
        except UserError as e:
            raise ApiError(422, f"animation: {e}", "animation") from None
        out.append((file, {**params, "animation": record}))
    return signed_outputs(out, target)


def media_type(params: dict) -> str:
    """The HTTP content type of one of `finish_files`' files."""
    return MEDIA_TYPES.get((params.get("animation") or {}).get("file", {}).get("format"), "image/png")


# ---- a set's legibility and consistency: measured by the server's judge, items redrawn -------------------------

MAX_REDRAWS = 3          # per item, at most: a request may ask for fewer (`max_redraws`)
OUTLIER_DISTANCE = 1.5   # a consistency outlier farther than this (1: an average item) is redrawn
NO_JUDGE = "not measured: no judge (the server was started without one: serve args.judge)"


@functools.lru_cache(maxsize=2)
def service_judge(uri: str):
    """The server's emoji judge (`emoji-ldm train-judge --out`), loaded once per replica."""
    from emoji_ldm.eval.judge import load_judge

    return load_judge(uri)


def first_frame(data: bytes):
    """A set item's image as the judge sees it: the PNG, or an animated loop's first frame (RGBA)."""
    from emoji_ldm.inference.animation import read_frames

    return read_frames(data)[0]


def check_judge(body, judge_uri: str) -> None:
    """409 naming `min_legibility` when `body` (a set or a job) asks for it on a server without a judge."""
    from emoji_ldm.serve.errors import ApiError

    if body.min_legibility is not None and not judge_uri:
        raise ApiError(409, "min_legibility: this server has no judge to measure legibility with (its operator "
                            "did not set args.judge); leave min_legibility out", "min_legibility")


def unmeasured(seeds: list[int]) -> dict:
    """The manifest's `quality` without a judge: it says so, and each item's seed."""
    return {"judge": None, "legibility": NO_JUDGE, "consistency": NO_JUDGE, "redraws": [], "seeds": list(seeds)}


def quality_report(judge_uri: str, judge, reads: list, body, consistency, redraws: list, seeds: list) -> dict:
    """The manifest's `quality` (a set's or a durable job's): the judge, legibility at chat size from each item's
    `theme_reads` (per theme, the worst, per item), consistency, every redraw, each item's final seed."""
    from emoji_ldm.eval.legibility import share_of, summarise
    from emoji_ldm.store.uri import public_uri

    figures = summarise(reads)
    figures.update(items=[share_of(r) for r in reads], min_legibility=body.min_legibility)
    if not figures["labelled"]:
        figures["note"] = "no item names a class the judge knows: nothing to measure legibility against"
    return {"judge": {"uri": public_uri(judge_uri), "label": judge.meta.get("label"), "classes": len(judge.classes)},
            "legibility": figures, "consistency": consistency, "redraws": redraws, "max_redraws": body.max_redraws,
            "seeds": list(seeds)}


async def most_legible(redraw, measure, reads: dict | None, floor: float, tries: int, max_redraws: int):
    """One item under `floor` redrawn until it reads at `floor` or its redraws run out, the most legible draw kept:
    the loop both a set (`draw_set`) and a durable job (`job_files.JobLegibility`) redraw with. `reads`: the
    first draw's `theme_reads`; `redraw(tries)` -> (seed, draw, image) for the item's redraw number `tries`
    (None: the job was cancelled); `measure(image)` -> its reads. Returns (the kept redraw or None for the first
    draw, its reads, the tries made, a record per redraw)."""
    import asyncio

    from emoji_ldm.eval.legibility import share_of

    kept, records, score = None, [], share_of(reads)
    while score is not None and score < floor and tries < max_redraws:
        tries += 1
        new = await redraw(tries)
        if new is None:
            break
        new_reads = await asyncio.to_thread(measure, new[2])
        new_score = share_of(new_reads)
        better = new_score is not None and new_score > score
        records.append({"reason": "legibility", "seed": new[0], "legibility": new_score, "was": score, "kept": better})
        if better:
            kept, reads, score = new, new_reads, new_score
    return kept, reads, tries, records


async def draw_set(sample, job, body, judge_uri: str = "", redraw=None) -> tuple[list[tuple[bytes, dict]], dict]:
    """A set's items drawn (`sample`: the ingress's SampleJob -> [(bytes, params)]) and, with the server's judge,
    measured: legibility at chat size (`eval.legibility`), an item under `body.min_legibility` redrawn with the
    next seed, the consistency outlier redrawn, each at most `body.max_redraws` times, every try recorded.
    `redraw` (default `sample`) draws the redraws: the ingress charges each to the key first, and a 429 from it
    ends the redraws (the set keeps what it has, and its quality says why). Returns (the items, the manifest's
    `quality`)."""
    import asyncio

    from emoji_ldm.serve.errors import ApiError

    check_judge(body, judge_uri)
    made = list(await sample(job))
    if not judge_uri:
        return made, unmeasured(job.seeds)
    judge = await asyncio.to_thread(service_judge, judge_uri)
    pack = _Pack(judge, job, made, body)
    redraw, stopped = redraw or sample, None
    try:
        await pack.legible(redraw)
        await pack.consistent(redraw)
    except ApiError as e:
        if e.status != 429:
            raise
        stopped = e.message
    quality = await asyncio.to_thread(pack.report, judge_uri)
    if stopped:
        quality["redraws_stopped"] = stopped
    return pack.made, quality


class _Pack:
    """A set being judged: its items (bytes, params) and their images, seeds and judge classes, the redraws."""

    def __init__(self, judge, job, made: list, body):
        from emoji_ldm.eval.legibility import item_labels

        self.judge, self.job, self.made, self.body = judge, job, made, body
        self.seeds, self.tries, self.redraws = list(job.seeds), [0] * len(made), []
        self.labels = item_labels(judge, body.items, list(job.prompts))
        self.images = [first_frame(data) for data, _ in made]

    def reads(self, i: int, image) -> dict | None:
        """`theme_reads` of item i's `image` (None: it names no class the judge knows)."""
        from emoji_ldm.eval.legibility import theme_reads

        return theme_reads(self.judge, [image], [self.labels[i]])[0]

    def share(self, i: int, image) -> float | None:
        """The share of chat themes on which the judge reads item i's `image` as its class (None: no class)."""
        from emoji_ldm.eval.legibility import share_of

        return share_of(self.reads(i, image))

    async def _redraw(self, sample, i: int, tries: int):
        """Item i drawn again from its seed + `tries`: (the seed, (bytes, params), its image)."""
        from dataclasses import replace

        seed = self.job.seeds[i] + tries
        (new,) = await sample(replace(self.job, prompts=(self.job.prompts[i],), seeds=(seed,)))
        return seed, new, first_frame(new[0])

    def _record(self, i: int, reason: str, seed: int, kept: bool, **scores) -> None:
        self.redraws.append({"index": i, "item": self.body.items[i], "reason": reason, "seed": seed, **scores,
                             "kept": kept})

    def _keep(self, i: int, seed: int, new, image) -> None:
        self.seeds[i], self.made[i], self.images[i] = seed, new, image

    async def legible(self, sample) -> None:
        """Each item under `min_legibility` redrawn from the next seed until it reads or its redraws run out; the
        most legible draw is kept (`most_legible`)."""
        import asyncio
        import functools

        floor = self.body.min_legibility
        for i in range(len(self.made) if floor is not None else 0):
            reads = await asyncio.to_thread(self.reads, i, self.images[i])
            kept, _, self.tries[i], records = await most_legible(
                functools.partial(self._redraw, sample, i), functools.partial(self.reads, i), reads, floor,
                self.tries[i], self.body.max_redraws)
            for record in records:
                self._record(i, **record)
            if kept:
                self._keep(i, *kept)

    async def consistent(self, sample) -> None:
        """The consistency outlier (farther than OUTLIER_DISTANCE) redrawn from its next seed while its redraws
        last; a draw is kept when the set's score rises and the item stays as legible as asked."""
        import asyncio

        from emoji_ldm.eval.legibility import consistency

        if len(self.made) < 3:
            return
        quality = await asyncio.to_thread(consistency, self.judge, self.images)
        floor = self.body.min_legibility
        while True:
            o = quality["outlier"]
            if quality["distances"][o] <= OUTLIER_DISTANCE or self.tries[o] >= self.body.max_redraws:
                return
            now = await asyncio.to_thread(self.share, o, self.images[o])
            self.tries[o] += 1
            seed, new, image = await self._redraw(sample, o, self.tries[o])
            trial = await asyncio.to_thread(consistency, self.judge, self.images[:o] + [image] + self.images[o + 1:])
            share = await asyncio.to_thread(self.share, o, image)
            legible = floor is None or share is None or share >= min(floor, now)
            kept = trial["score"] > quality["score"] and legible
            self._record(o, "consistency", seed, kept, consistency=trial["score"], was=quality["score"],
                         distance=quality["distances"][o], legibility=share)
            if kept:
                self._keep(o, seed, new, image)
                quality = trial

    def report(self, judge_uri: str) -> dict:
        """The manifest's `quality` (`quality_report`), the items measured once more as they were kept."""
        from emoji_ldm.eval.legibility import consistency, theme_reads

        return quality_report(judge_uri, self.judge, theme_reads(self.judge, self.images, self.labels), self.body,
                              consistency(self.judge, self.images), self.redraws, self.seeds)
