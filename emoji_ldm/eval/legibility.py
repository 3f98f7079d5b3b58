"""Emoji as people see them: legibility at chat size on light and dark themes, and how alike a pack looks.

- Legibility: an emoji shows at about 22 px beside text, on the chat's background. Each image is shrunk to
  `CHAT_PX` (premultiplied, as a client would), composited on each theme's background, and shown to the judge
  at its own size; legibility is the judge's prompt accuracy there, per theme. An emoji that reads at 128 px on
  white and is a smudge at 22 px on Discord's dark grey scores low on that theme.
- Consistency: a set drawn as one pack should share a style. Each item's judge features (what the judge
  sees), palette (its mean colour) and outline (the share of its pixels on the alpha edge) are compared with
  the set's; the score is the mean cosine similarity of the items' features to their mean (1: alike), and
  the outlier is the item farthest from the others on the three together.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageColor

CHAT_PX = 22
# the message backgrounds of the chat clients' light and dark themes
THEMES = {"slack-light": "#ffffff", "slack-dark": "#1a1d21", "discord-light": "#ffffff", "discord-dark": "#313338"}


def at_chat_size(image: Image.Image, background: str, px: int = CHAT_PX) -> Image.Image:
    """`image` as a chat shows it: shrunk to `px` (premultiplied), on `background`; RGB at `px`."""
    from emoji_ldm.imaging import resize_rgba

    small = resize_rgba(image.convert("RGBA"), (px, px))
    canvas = Image.new("RGBA", small.size, ImageColor.getrgb(background)[:3] + (255,))
    return Image.alpha_composite(canvas, small).convert("RGB")


def chat_pixels(judge, images: list[Image.Image], background: str, px: int = CHAT_PX) -> np.ndarray:
    """(B, S, S, 3) uint8: the images at chat size on `background`, enlarged back to the judge's size (the judge
    sees only what survived the shrink)."""
    return np.stack([np.asarray(at_chat_size(im, background, px).resize((judge.size, judge.size),
                                                                        Image.Resampling.BILINEAR), dtype=np.uint8)
                     for im in images])


def theme_reads(judge, images: list[Image.Image], labels: list[str | None], px: int = CHAT_PX) -> list[dict | None]:
    """Per image, {theme: whether the judge reads it as its label at chat size on that theme}; None for an image
    whose label the judge does not know. What `legibility` and `share_of` are made of, and what a durable
    job stores per item, so that its summary never measures an item twice."""
    reads: list[dict | None] = [None] * len(images)
    known = [i for i, y in enumerate(labels) if y in set(judge.classes)]
    for i in known:
        reads[i] = {}
    for theme, colour in THEMES.items():
        if not known:
            break
        predicted = judge.predict(chat_pixels(judge, [images[i] for i in known], colour, px))
        for p, i in zip(predicted, known):
            reads[i][theme] = bool(p == labels[i])
    return reads


def share_of(reads: dict | None) -> float | None:
    """The share of chat themes on which one image reads as its label (None: no label to read it as)."""
    return None if reads is None else round(float(np.mean(list(reads.values()))), 4)


def summarise(reads: list[dict | None], px: int = CHAT_PX) -> dict:
    """`theme_reads` as the judge's prompt accuracy per theme over the labelled images: {"px", "themes": {theme:
    accuracy}, "min": the worst theme, "labelled": how many counted}."""
    known = [r for r in reads if r is not None]
    if not known:
        return {"px": px, "themes": {}, "min": None, "labelled": 0}
    themes = {theme: round(float(np.mean([r[theme] for r in known])), 4) for theme in THEMES}
    return {"px": px, "themes": themes, "min": min(themes.values()), "labelled": len(known)}


def legibility(judge, images: list[Image.Image], labels: list[str | None], px: int = CHAT_PX) -> dict:
    """The judge's prompt accuracy at chat size, per theme, over the images whose label the judge knows:
    {"px", "themes": {theme: accuracy}, "min": the worst theme, "labelled": how many counted}."""
    return summarise(theme_reads(judge, images, labels, px), px)


def _palette_outline(image: Image.Image) -> np.ndarray:
    """(4,): the mean colour of the opaque part (0-1) and the share of pixels on the alpha edge."""
    x = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0  # (H, W, 4)
    alpha = x[..., 3]
    colour = (x[..., :3] * alpha[..., None]).sum(axis=(0, 1)) / max(float(alpha.sum()), 1e-6)  # (3,)
    solid = alpha > 0.5
    edge = solid ^ np.roll(solid, 1, 0) | solid ^ np.roll(solid, 1, 1)
    return np.append(colour, edge.mean())


def consistency(judge, images: list[Image.Image]) -> dict:
    """How alike a set looks: {"score": mean cosine similarity of the judge features to their mean (1: alike;
    None without a judge), "palette_spread", "outline_spread" (standard deviations across items), "outlier": the
    index of the item farthest from the rest, "distances": each item's distance (features, palette and outline,
    each scaled by the set's own spread; without a judge palette and outline only)}; a set of one is consistent
    by definition."""
    if len(images) < 2:
        return {"score": 1.0, "palette_spread": 0.0, "outline_spread": 0.0, "outlier": None, "distances": [0.0]}
    style = np.stack([_palette_outline(im) for im in images])  # (B, 4)
    parts = [np.linalg.norm(style[:, :3] - style[:, :3].mean(0), axis=1), np.abs(style[:, 3] - style[:, 3].mean())]
    score = None
    if judge is not None:
        feats = judge.features(judge.pixels(images))  # (B, F)
        unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-8)
        centre = unit.mean(axis=0)
        similarity = unit @ (centre / max(float(np.linalg.norm(centre)), 1e-8))  # (B,)
        parts.insert(0, 1 - similarity)
        score = round(float(similarity.mean()), 4)
    distance = sum(p / (p.mean() + 1e-8) for p in parts) / len(parts)  # (B,): 1 is an average item
    return {"score": score,
            "palette_spread": round(float(style[:, :3].std(axis=0).mean()), 4),
            "outline_spread": round(float(style[:, 3].std()), 4),
            "outlier": int(np.argmax(distance)), "distances": [round(float(d), 3) for d in distance]}


def item_labels(judge, items: list[str], prompts: list[str]) -> list[str | None]:
    """The judge's class for each set item, or None where it has none: the Unicode subgroup or group of the
    emoji the prompt (else the item) names ("grinning cat face" -> cat-face), or the item itself for a judge
    of tags."""
    from emoji_ldm.eval.judge import row_label

    kind, classes = judge.meta.get("label", "subgroup"), set(judge.classes)
    labels = []
    for item, prompt in zip(items, prompts):
        found = row_label(kind, None, prompt, item) if kind != "tag" else item
        if found not in classes and kind != "tag":
            found = row_label(kind, None, item, item)
        labels.append(found if found in classes else None)
    return labels
