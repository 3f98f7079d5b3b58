"""Generation parameters inside every PNG that `generate`, the service and `bulk` write.

Why: a PNG that leaves its set folder or bulk output should still say what
made it, the way Stable Diffusion web UIs write theirs, so a user can
reproduce an image and `emoji-ldm lineage` can go from the image to its model,
data and code. Each image carries small PNG text chunks (`tEXt`, or `iTXt`
when the text is not Latin-1, e.g. an emoji in the prompt: PIL picks), read
back with `PIL.Image.open(path).text`:

    prompt, negative_prompt, seed, steps, guidance, scheduler, size (WxH),
    model (the model folder's URI), model_content_id (sha256 of its weights,
    from the model card), code_version, and with a LoRA adapter (`serve
    --adapter`) adapter, adapter_uri and adapter_content_id, and for a PNG
    resized for an upload target (`inference.targets`) target ("slack
    128x128"; `size` stays the size drawn, which reproduces the image), and
    for an animated loop (`inference.animation`) loop ("16 frames, motion 0.3,
    12 fps, noise circle")

plus `parameters`, the same in the one-chunk layout of the web UIs
("PROMPT\\nNegative prompt: ...\\nSteps: 25, Sampler: dpmpp, CFG scale: 5.0,
Seed: 1, Size: 32x32, Model hash: ..., Model: ..."), and `Software`. No
config goes in: the model URI and content id lead to the model card, which
holds the rest.

`generation_params` is the one definition of these fields: the PNG chunks and
the service's JSON answers are both made from its dict. A sheet (a grid of
several images) gets the fields its images share.
"""

from __future__ import annotations

import io

FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "size", "model",
          "model_content_id", "code_version", "adapter", "adapter_uri", "adapter_content_id", "target", "loop")
_INTS = ("seed", "steps")


def generation_params(*, prompt: str | None, seed: int | None, negative_prompt: str, steps: int,
                      guidance: float, scheduler: str | None, width: int, height: int, model: str | None,
                      model_content_id: str | None) -> dict:
    """The parameters of one image (or, with prompt/seed None, what a sheet's images share); None values left out."""
    from emoji_ldm.version import code_version

    params = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
              "guidance": float(guidance), "scheduler": scheduler, "size": f"{width}x{height}", "model": model,
              "model_content_id": model_content_id, "code_version": code_version()}
    return {k: v for k, v in params.items() if v is not None}


def shared_params(params: list[dict]) -> dict:
    """The fields every image of a sheet has in common (a set shares its seed, not its prompts)."""
    if not params:
        return {}
    return {k: v for k, v in params[0].items() if all(p.get(k) == v for p in params[1:])}


def _webui_text(params: dict) -> str:
    """The `parameters` chunk in the Stable Diffusion web UI layout (its "PNG Info" reads it)."""
    content_id = params.get("model_content_id", "")
    pairs = [("Steps", params.get("steps")), ("Sampler", params.get("scheduler")),
             ("CFG scale", params.get("guidance")), ("Seed", params.get("seed")), ("Size", params.get("size")),
             ("Model hash", content_id.split(":")[-1][:10] or None), ("Model", params.get("model")),
             ("Version", f"emoji-ldm {params['code_version']}" if params.get("code_version") else None)]
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def png_text(params: dict) -> dict[str, str]:
    """Text chunk keyword -> text for `params`."""
    text = {k: str(params[k]) for k in FIELDS if k in params}
    text["parameters"] = _webui_text(params)
    text["Software"] = f"emoji-ldm {params.get('code_version', '')}".strip()
    return text


def png_info(params: dict | None):
    """Pillow's `pnginfo` for `params` (None when `params` is None or empty)."""
    from PIL.PngImagePlugin import PngInfo

    if not params:
        return None
    info = PngInfo()
    for key, value in png_text(params).items():
        info.add_text(key, value)  # tEXt when Latin-1, else iTXt
    return info


def encode_png(image, params: dict | None = None) -> bytes:
    """PNG bytes of a PIL image, with `params` as text chunks (none when `params` is None or empty)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(params))
    return buf.getvalue()


def read_params(text: dict[str, str]) -> dict:
    """The generation parameters among a PNG's text chunks (`Image.open(p).text`), typed; {} when none."""
    out = {}
    for key in FIELDS:
        value = text.get(key)
        if value is None:
            continue
        try:
            out[key] = int(value) if key in _INTS else float(value) if key == "guidance" else value
        except ValueError:
            out[key] = value  # written by hand or by another tool: keep the text
    return out
