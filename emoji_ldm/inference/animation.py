"""Animated emoji drawn by the model: a seamless loop of frames, encoded as APNG, GIF or WebP under a byte cap.

The loop: noise on a closed path. Frame k of N starts from

    z_k = cos(r) * a + sin(r) * (cos(t_k) * b + sin(t_k) * c),    t_k = 2 pi k / N,  r = motion * pi / 2

with a, b, c independent Gaussian noises drawn from the seed (a is the still image's noise). Every z_k is itself a
standard Gaussian (cos^2 + sin^2 = 1), so every frame is an ordinary sample of the model; the path is a small
circle around the still image's noise, so `motion` sets how far the loop strays from it; and t_N = 2 pi is t_0,
so the loop closes exactly. A deterministic sampler (DPM++ or DDIM) maps nearby noise to nearby images, which
is what makes the frames move smoothly. Why not a prompt morph and back: it needs two prompts per emoji, and
the CLIP-space path between two prompts passes through images that are neither; the noise circle keeps the
prompt fixed (bench/animation.py measures both: frame change, loop closure and flicker).

Alpha is kept in every format: APNG and WebP carry 8-bit alpha; GIF has one transparent palette index, so
edge pixels are blended onto a matte (the target's theme background: light or dark) and cut at half alpha.
A file over the target's cap is made smaller by frame count, then palette, then size, in that order, and
what was given up is recorded (`Encoded`).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageColor

from emoji_ldm.config import opt
from emoji_ldm.errors import UserError

FORMATS = ("apng", "gif", "webp")
EXTENSIONS = {"apng": ".png", "gif": ".gif", "webp": ".webp"}
MAX_FRAMES = 48
MIN_FRAMES = 2
MIN_FIT_FRAMES = 6  # the fewest frames that still read as motion; fitting drops frames down to this
MIN_FIT_SIZE = 32  # pixels: fitting shrinks the image down to this
DETERMINISTIC = ("dpmpp", "ddim")
# the chat themes' backgrounds a GIF's edges are blended onto (Slack and Discord, light and dark)
MATTES = {"light": "#ffffff", "dark": "#313338"}


@dataclass(frozen=True)
class AnimationSettings:
    frames: int = opt(0, help=f"an animated loop of N frames, {MIN_FRAMES}-{MAX_FRAMES} (0: still PNGs)")
    format: str = opt("apng", help=f"the animated file: {' | '.join(FORMATS)}")
    motion: float = opt(0.3, help="how far the loop strays from the still image, above 0 and at most 1")
    fps: int = opt(12, help="frames per second, 1-50")
    matte: str = opt("light", help="GIF only (one-bit alpha): the background its soft edges are blended onto: "
                                   "light, dark or #rrggbb")

    def __post_init__(self):
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or not (
                self.frames == 0 or MIN_FRAMES <= self.frames <= MAX_FRAMES):
            raise UserError(f"frames must be 0 (a still image) or from {MIN_FRAMES} to {MAX_FRAMES}, "
                            f"got {self.frames!r}")
        if self.format not in FORMATS:
            raise UserError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not isinstance(self.motion, (int, float)) or not (0 < self.motion <= 1):
            raise UserError(f"motion must be above 0 and at most 1, got {self.motion!r}")
        if isinstance(self.fps, bool) or not isinstance(self.fps, int) or not (1 <= self.fps <= 50):
            raise UserError(f"fps must be a whole number from 1 to 50, got {self.fps!r}")
        matte_colour(self.matte)

    @property
    def animated(self) -> bool:
        return self.frames > 0

    def check_scheduler(self, scheduler: str | None) -> None:
        if self.animated and scheduler not in DETERMINISTIC:
            raise UserError(f"an animated loop needs a deterministic sampler ({' or '.join(DETERMINISTIC)}), "
                            f"got scheduler {scheduler!r}: its frames would flicker")


def matte_colour(matte: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(MATTES.get(matte, matte))[:3]
    except (ValueError, AttributeError):
        raise UserError(f"matte must be light, dark or a colour like #313338, got {matte!r}") from None


def loop_noise(shape: tuple[int, ...], seed: int, frames: int, motion: float):
    """The starting latents of a loop's frames: (frames, C, h, w) for a latent `shape` (1, C, h, w). a, b and c
    are the first three draws of the seed's CPU generator, so a is the seed's still-image noise
    (`Sampler.noise`)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    a, b, c = (torch.randn(shape, generator=generator) for _ in range(3))  # each (1, C, h, w)
    r = motion * math.pi / 2
    t = torch.arange(frames, dtype=torch.float32) * (2 * math.pi / frames)  # (N,)
    cos_t, sin_t = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return math.cos(r) * a + math.sin(r) * (cos_t * b + sin_t * c)  # (N, C, h, w)


# ---- metrics of a loop ---------------------------------------------------------------------------------------

def _premultiplied(frames: list[Image.Image]) -> np.ndarray:
    x = np.stack([np.asarray(f.convert("RGBA"), dtype=np.float32) / 255.0 for f in frames])  # (N, H, W, 4)
    return np.concatenate([x[..., :3] * x[..., 3:], x[..., 3:]], axis=-1)


def loop_metrics(frames: list[Image.Image]) -> dict[str, float]:
    """How a loop moves, from its frames (premultiplied RGBA, 0-1):
    - frame_change: the mean absolute change from one frame to the next (0: a still);
    - loop_closure: the change from the last frame back to the first over the mean step (about 1: seamless;
      much more: a visible jump where the loop restarts);
    - flicker: the mean absolute change of a frame's overall brightness (its mean premultiplied luminance)
      from one frame to the next, the last to the first included (0: steady; motion alone barely moves it)."""
    x = _premultiplied(frames)
    if len(x) < 2:
        return {"frame_change": 0.0, "loop_closure": 0.0, "flicker": 0.0}
    steps = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))  # (N-1,)
    mean_step = float(steps.mean())
    wrap = float(np.abs(x[0] - x[-1]).mean())
    luminance = (x[..., :3] @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)).mean(axis=(1, 2))  # (N,)
    flicker = float(np.abs(np.diff(np.append(luminance, luminance[0]))).mean())
    return {"frame_change": round(mean_step, 5),
            "loop_closure": round(wrap / mean_step, 3) if mean_step > 1e-8 else 0.0,
            "flicker": round(flicker, 5)}


# ---- encoding under a cap ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoded:
    data: bytes
    format: str
    frames: int  # frames kept (fitting may drop every other one)
    colours: int | None  # palette size, None: full colour
    size: int  # pixels, square
    duration_ms: int  # per frame

    def record(self) -> dict:
        return {"format": self.format, "frames": self.frames, "colours": self.colours, "size": self.size,
                "frame_ms": self.duration_ms, "bytes": len(self.data)}


def _gif_frame(frame: Image.Image, matte: tuple[int, int, int], colours: int) -> Image.Image:
    """One GIF frame: soft edges blended onto the matte, alpha cut at one half into the last palette index."""
    rgba = frame.convert("RGBA")
    background = Image.new("RGBA", rgba.size, matte + (255,))
    flat = Image.alpha_composite(background, rgba).convert("RGB")
    p = flat.quantize(min(colours, 255), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    transparent = np.asarray(rgba)[..., 3] < 128
    index = np.asarray(p).copy()
    index[transparent] = 255
    out = Image.fromarray(index, mode="P")
    palette = (p.getpalette() or [])[:765]
    out.putpalette(palette + [0] * (768 - len(palette)))
    return out


def _save(frames: list[Image.Image], fmt: str, duration: int, colours: int | None, matte, params) -> bytes:
    buf = io.BytesIO()
    if fmt == "gif":
        gif = [_gif_frame(f, matte, colours or 255) for f in frames]
        gif[0].save(buf, format="GIF", save_all=True, append_images=gif[1:], duration=duration, loop=0,
                    disposal=2, transparency=255, optimize=False,
                    comment=json.dumps(params, ensure_ascii=True).encode() if params else b"")
    elif fmt == "apng":
        from emoji_ldm.inference.pngmeta import png_info

        seq = [f.convert("RGBA") for f in frames]
        if colours:
            seq = [f.quantize(colours, method=Image.Quantize.FASTOCTREE).convert("RGBA") for f in seq]
        seq[0].save(buf, format="PNG", save_all=True, append_images=seq[1:], duration=duration, loop=0,
                    disposal=1, blend=0, optimize=True, pnginfo=png_info(params) if params else None)
    else:
        quality = 100 if colours is None else max(30, colours * 100 // 256)  # fewer colours: lossier
        frames[0].convert("RGBA").save(buf, format="WEBP", save_all=True,
                                       append_images=[f.convert("RGBA") for f in frames[1:]], duration=duration,
                                       loop=0, lossless=colours is None, quality=quality, method=4,
                                       exact=True)
    return buf.getvalue()


def _attempts(frames: int, size: int):
    """(frames, colours, size) to try, smallest sacrifice first: frame count, then palette, then size."""
    counts = [frames]
    while counts[-1] // 2 >= MIN_FIT_FRAMES:
        counts.append(counts[-1] // 2)
    for n in counts:
        yield n, None, size
    for colours in (128, 64, 32, 16):
        yield counts[-1], colours, size
    s = size
    while int(s * 0.75) >= MIN_FIT_SIZE:
        s = int(s * 0.75)
        yield counts[-1], 16, s


def encode_loop(frames: list[Image.Image], settings: AnimationSettings, max_bytes: int | None = None,
                size: int | None = None, params: dict | None = None) -> Encoded:
    """The frames as one looping file of `settings.format` at `size` pixels (default: as drawn), under
    `max_bytes` (None: no cap), or a UserError that says the cap cannot be met."""
    from emoji_ldm.imaging import resize_rgba

    if len(frames) < MIN_FRAMES:
        raise UserError(f"an animation needs at least {MIN_FRAMES} frames, got {len(frames)}")
    size = size or frames[0].width
    period_ms = 1000 * len(frames) / settings.fps  # the loop's length stays the same when frames are dropped
    matte = matte_colour(settings.matte)
    last = None
    for n, colours, px in _attempts(len(frames), size):
        kept = frames[::len(frames) // n][:n]
        scaled = [f if f.size == (px, px) else resize_rgba(f.convert("RGBA"), (px, px)) for f in kept]
        duration = max(20, round(period_ms / n))
        data = _save(scaled, settings.format, duration, colours, matte, params)
        last = Encoded(data, settings.format, n, colours, px, duration)
        if max_bytes is None or len(data) <= max_bytes:
            return last
    raise UserError(f"an animated {settings.format} of {len(frames)} frames does not fit {max_bytes} bytes even at "
                    f"{last.frames} frames, {last.colours} colours and {last.size} px ({len(last.data)} bytes): "
                    "ask for fewer frames or another format")


def read_frames(data: bytes) -> list[Image.Image]:
    """The frames of an animated file, as RGBA."""
    from PIL import ImageSequence

    with Image.open(io.BytesIO(data)) as im:
        return [f.convert("RGBA") for f in ImageSequence.Iterator(im)]


# ---- a drawn loop and its file ---------------------------------------------------------------------------------

LOOP_PATH = "noise circle around the seed's noise (the seed's first three Gaussian draws a, b, c)"


def loop_record(settings: AnimationSettings) -> dict:
    """The loop as lineage records it: how many frames, how far from the still, how fast, along which path."""
    return {"frames": settings.frames, "motion": settings.motion, "fps": settings.fps, "path": LOOP_PATH}


def loop_text(settings: AnimationSettings) -> str:
    """The loop in one line, for a file's `loop` text chunk."""
    return f"{settings.frames} frames, motion {settings.motion:g}, {settings.fps} fps, noise circle"


def drawn_loop(frames: list[Image.Image], job, i: int, sampler, metadata: bool = True) -> tuple[bytes, dict]:
    """Image `i` of an animated `SampleJob` as drawn: (a lossless APNG of all its frames at the drawn size, its
    generation parameters with the loop); `fitted_loop` makes the file a target takes from it."""
    from dataclasses import replace

    adapter = sampler.adapters.get(job.adapter) if job.adapter else None
    params = {**job.image_params(i, frames[0].width, frames[0].height, sampler.model_uri, sampler.content_id,
                                 adapter), "loop": loop_text(job.animation)}
    lossless = replace(job.animation, format="apng")
    return encode_loop(frames, lossless, params=params if metadata else None).data, params


def fitted_loop(drawn: bytes, settings: AnimationSettings, target, params: dict | None = None) -> tuple[bytes, dict]:
    """A drawn loop (`drawn_loop`'s APNG) as `settings.format` at the target's size under its cap (`targets.
    Target`): (the file, its record {"loop", "file": what fitting kept, "metrics": `loop_metrics`}); a UserError
    when it cannot fit. `params` become the file's text (PNG chunks, GIF comment)."""
    frames = read_frames(drawn)
    if params and target.size:
        params = {**params, "target": f"{target.name} {target.size}x{target.size}"}
    encoded = encode_loop(frames, settings, target.max_bytes, target.size, params)
    return encoded.data, {"loop": loop_record(settings), "file": encoded.record(), "metrics": loop_metrics(frames)}
