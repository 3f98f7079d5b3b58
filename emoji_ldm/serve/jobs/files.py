"""A durable job's files (serve/durable.py): what its result holds, what an animated job is refused for, and
each item's legibility at chat size, measured (and redrawn under `min_legibility`) once, as its chunk is drawn.

An animated job (`animation` in its request, as for /v1/emoji-sets) is drawn as the sets' loops are: its
Drawer's SampleJob carries the animation, so `Sampler.pngs` draws each item as a lossless APNG of all its frames
(`animation.drawn_loop`), kept under the job's images/ like a still; packaging makes each the request's format
under the target's cap with the sets' own `set_manifest` / `set_files` (`sets.fitted_loops`), which record the
loop and the file (frames, format, colours, size, bytes) and the loop's metrics on each manifest item.

A loop that could not be made to fit its cap would fail the job only once every item is drawn, so a request is
checked when it is submitted: the smallest file fitting can fall back to (`animation.encode_loop`: the fewest
frames, 16 colours, the smallest size) of worst-case frames (uniform noise, which no encoder compresses) must be
under the cap, with room for the generation parameters the file carries as text. If it is, every loop fits.
"""

from __future__ import annotations

import functools

from emoji_ldm.serve.schemas import JobRequest
from emoji_ldm.store.artifacts import read_bytes, read_json, write_bytes, write_zip
from emoji_ldm.store.uri import join

PARAMS_ALLOWANCE = 4096  # bytes: a file's generation parameters as text (prompts of at most 500 characters)


@functools.lru_cache(maxsize=64)
def worst_case_bytes(settings, target) -> int:
    """The bytes of the smallest file `encode_loop` falls back to for `settings` (`AnimationSettings`) at
    `target` (`targets.Target`, with a size), its frames uniform noise."""
    import numpy as np
    from PIL import Image

    from emoji_ldm.inference.animation import _attempts, _save, matte_colour

    *_, (frames, colours, size) = _attempts(settings.frames, target.size)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (size, size, 4), dtype=np.uint8), "RGBA") for _ in range(frames)]
    return len(_save(noise, settings.format, 20, colours, matte_colour(settings.matte), None))


def check_loops_fit(body: JobRequest) -> None:
    """422 naming `animation` when a loop of `body` might not fit its target's cap (see the module's note)."""
    from emoji_ldm.inference.targets import get_target
    from emoji_ldm.serve.errors import ApiError

    settings, target = body.animation.settings(), get_target(body.target)
    if not settings.animated or target.max_bytes is None or target.size is None:
        return
    need = worst_case_bytes(settings, target) + PARAMS_ALLOWANCE
    if need > target.max_bytes:
        raise ApiError(422, f"animation: a {settings.format} loop of {settings.frames} frames may not fit "
                            f"{target.name}'s {target.max_bytes} bytes (its smallest fallback can take {need}): ask "
                            "for fewer frames or another format", "animation")


def items_per_chunk(step: int, body: JobRequest) -> int:
    """Items one Drawer call draws: `step` images (one pipeline call's worth), or for loops as many whole loops as
    `step` frames hold, at least one (its frames are drawn in calls of `step`)."""
    frames = body.animation.frames
    return max(1, step // frames) if frames else step


def animation_state(body: JobRequest) -> dict | None:
    """The job state's `animation`: the loop (`animation.loop_record`) and the file format; None for stills."""
    from emoji_ldm.inference.animation import loop_record

    settings = body.animation.settings()
    return {**loop_record(settings), "format": settings.format} if settings.animated else None


def package(folder: str, job_id: str, model: str, body: dict, done: int, partial: bool, png_metadata: bool,
            judge_uri: str = "") -> dict:
    """The set's files (as /v1/emoji-sets makes them: PNGs, or loops as their format under the target's cap) for
    the `done` images drawn under `folder`/images: result/<id>.zip and result/manifest.json; the result's
    `legibility`, its summary (`job_quality`)."""
    from emoji_ldm.inference.sampler import model_card, model_uri
    from emoji_ldm.serve.sets import set_files, set_manifest

    request = JobRequest.model_validate(body)
    draws = request.draws()[:done]
    settings = request.model_dump(include={"negative_prompt", "steps", "guidance", "seed", "scheduler", "size",
                                           "adapter"})
    uri = model_uri(model)
    quality = job_quality(folder, request, done, judge_uri)
    manifest = set_manifest(job_id, request.theme, [d[0] for d in draws], [d[1] for d in draws], settings,
                            model_card(uri), uri, request.target, request.animation.settings(), quality)
    manifest.update(kind=request.kind, partial=partial, done=done, total=request.images())
    pngs = [read_bytes(join(folder, "images", f"{i:05d}.png")) for i in range(done)]
    params = [read_json(join(folder, "images", f"{i:05d}.json")) for i in range(done)]
    files = set_files(manifest, pngs, params if png_metadata else None)
    result = join(folder, "result")
    write_zip(join(result, f"{job_id}.zip"), files, job_id)
    write_bytes(join(result, "manifest.json"), files["manifest.json"])
    figures = manifest["quality"]["legibility"]
    summary = figures if isinstance(figures, str) else {
        **{k: v for k, v in figures.items() if k != "items"}, "redraws": len(manifest["quality"]["redraws"])}
    return {"uri": result, "zip": join(result, f"{job_id}.zip"), "manifest": join(result, "manifest.json"),
            "legibility": summary}


# ---- legibility at chat size: each item measured (and redrawn) once, as its chunk is drawn -------------------

JOB_CONSISTENCY = ("not measured for jobs: a job's items are drawn and kept chunk by chunk; /v1/emoji-sets "
                   "measures a pack's consistency")


def legibility_file(folder: str, index: int) -> str:
    """images/<index>.legibility.json: an item's final seed, its reads at chat size and its redraws."""
    return join(folder, "images", f"{index:05d}.legibility.json")


def job_judge(request: dict, server_judge: str) -> str:
    """The judge a job is measured with: the server's when the job was created (its request.json's `judge`, the
    public URI), the server's now to load it; "" for a job made without one. A job resumed by a server with
    another judge, or none, fails: its items would be measured two ways."""
    from emoji_ldm.errors import UserError
    from emoji_ldm.store.uri import public_uri

    made_with = request.get("judge") or ""
    if made_with and made_with != public_uri(server_judge):
        raise UserError(f"this job is measured by the judge {made_with!r}, but the server that resumed it has "
                        f"{public_uri(server_judge) or 'none'!r}: resume it on a server with args.judge {made_with}")
    return server_judge if made_with else ""


class JobLegibility:
    """A job's items measured at chat size by its server's judge as each chunk is drawn, before the chunk counts
    as done; an item under `min_legibility` redrawn with `sets.most_legible` (the sets' own loop) from
    `JobRequest.redraw_seed`. A resumed job never measures or redraws an item it has recorded."""

    def __init__(self, judge_uri: str, request: JobRequest):
        from emoji_ldm.serve.sets import service_judge

        self.judge, self.request, self.draws = service_judge(judge_uri), request, request.draws()

    def chunk(self, start: int, made: list, redraw) -> list[dict]:
        """Records of the chunk's items (from image `start`), `made` [(bytes, params)] changed in place to the kept
        draws; `redraw(prompt, seed)` -> [(bytes, params)] or None (cancelled: the caller drops the chunk)."""
        import asyncio

        from emoji_ldm.eval.legibility import item_labels, share_of, theme_reads
        from emoji_ldm.serve.sets import first_frame

        draws = self.draws[start:start + len(made)]
        labels = item_labels(self.judge, [d[0] for d in draws], [d[1] for d in draws])
        reads = theme_reads(self.judge, [first_frame(data) for data, _ in made], labels)
        records = []
        for k, (item, prompt, seed) in enumerate(draws):
            record = {"index": start + k, "item": item, "seed": seed, "themes": reads[k], "redraws": []}
            if self.request.min_legibility is not None:
                asyncio.run(self._legible(record, labels[k], prompt, made, k, redraw))
            records.append({**record, "legibility": share_of(record["themes"])})
        return records

    async def _legible(self, record: dict, label, prompt: str, made: list, k: int, redraw) -> None:
        from emoji_ldm.eval.legibility import theme_reads
        from emoji_ldm.serve.sets import first_frame, most_legible

        async def again(tries: int):
            seed = self.request.redraw_seed(record["index"], tries)
            new = redraw(prompt, seed)
            return None if new is None else (seed, new[0], first_frame(new[0][0]))

        kept, reads, _, tried = await most_legible(
            again, lambda image: theme_reads(self.judge, [image], [label])[0], record["themes"],
            self.request.min_legibility, 0, self.request.max_redraws)
        record["redraws"] = [{"index": record["index"], "item": record["item"], **t} for t in tried]
        if kept:
            record.update(seed=kept[0], themes=reads)
            made[k] = kept[1]


def job_quality(folder: str, request: JobRequest, done: int, judge_uri: str) -> dict:
    """The manifest's `quality` for the `done` items, from their records (nothing measured again); without a
    judge, the sets' "no judge" marker."""
    from emoji_ldm.serve.sets import quality_report, service_judge, unmeasured

    if not judge_uri:
        return unmeasured([seed for _, _, seed in request.draws()[:done]])
    records = [read_json(legibility_file(folder, i)) for i in range(done)]
    return quality_report(judge_uri, service_judge(judge_uri), [r["themes"] for r in records], request,
                          JOB_CONSISTENCY, [t for r in records for t in r["redraws"]], [r["seed"] for r in records])
