"""Legibility at chat size and pack consistency, with a judge trained here in seconds to tell a red disc from a
blue square (a real `Judge`, a real training loop: small, so the test shows what the metrics do, not how good
the project's judge is)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from emoji_ldm.eval.judge import Judge, build_net
from emoji_ldm.eval.legibility import CHAT_PX, THEMES, at_chat_size, consistency, legibility, share_of, theme_reads


def _shape(kind: str, size: int = 64, scale: float = 0.8, colour=None, jitter: int = 0) -> Image.Image:
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    r = size * scale / 2
    c = size / 2 + jitter
    box = (c - r, c - r, c + r, c + r)
    if kind == "red":
        d.ellipse(box, fill=colour or (220, 30, 30, 255))
    else:
        d.rectangle(box, fill=colour or (30, 60, 220, 255))
    return im


@pytest.fixture(scope="module")
def judge() -> Judge:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    meta = {"classes": ["red", "blue"], "image_size": 32, "label": "tag"}
    net = build_net(2, 8)
    j = Judge(net, meta)
    images, labels = [], []
    for _ in range(64):
        kind = ["red", "blue"][int(rng.integers(2))]
        bg = "#" + "".join(f"{int(v):02x}" for v in rng.integers(0, 256, 3))
        im = at_chat_size(_shape(kind, scale=float(rng.uniform(0.5, 0.9)), jitter=int(rng.integers(-6, 7))), bg,
                          int(rng.integers(16, 40)))
        images.append(np.asarray(im.resize((32, 32)), dtype=np.uint8))
        labels.append(kind == "blue")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    net.train()
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    return j


def test_at_chat_size_is_22px_on_the_theme():
    small = at_chat_size(_shape("red"), THEMES["discord-dark"])
    assert small.size == (CHAT_PX, CHAT_PX) and small.mode == "RGB"
    assert small.getpixel((0, 0)) == (0x31, 0x33, 0x38)  # the transparent corner shows the theme
    r, g, b = small.getpixel((CHAT_PX // 2, CHAT_PX // 2))
    assert r > 150 and g < 80 and b < 80  # the subject keeps its colour


def test_legibility_per_theme_and_what_a_smudge_scores(judge):
    clear = [_shape("red"), _shape("blue"), _shape("red", jitter=3), _shape("blue", jitter=-3)]
    labels = ["red", "blue", "red", "blue"]
    result = legibility(judge, clear, labels)
    assert set(result["themes"]) == set(THEMES) and result["labelled"] == 4 and result["px"] == CHAT_PX
    assert result["min"] == 1.0
    # a near-white, mostly transparent square: at 22 px it is lost on the light themes
    ghost = _shape("blue", scale=0.5, colour=(235, 235, 255, 60))
    faint, clear_one = theme_reads(judge, [ghost, _shape("blue")], ["blue", "blue"])
    assert share_of(faint) < share_of(clear_one)
    # labels the judge does not know are left out, and said so
    assert legibility(judge, clear, [None, "cat", None, None]) == {"px": CHAT_PX, "themes": {}, "min": None,
                                                                     "labelled": 0}


def test_consistency_names_the_outlier(judge):
    pack = [_shape("red", jitter=j) for j in (-2, 0, 2)] + [_shape("blue")]
    result = consistency(judge, pack)
    assert result["outlier"] == 3
    alike = consistency(judge, [_shape("red", jitter=j) for j in (-2, 0, 2, 1)])
    assert alike["score"] > result["score"]
    assert alike["palette_spread"] < result["palette_spread"]
    assert consistency(judge, pack[:1])["score"] == 1.0
    # without a judge: palette and outline alone still name the outlier; the feature score is not made up
    styled = consistency(None, pack)
    assert styled["outlier"] == 3 and styled["score"] is None


def test_item_labels_name_the_judges_classes():
    from emoji_ldm.eval.legibility import item_labels

    class Subgroups:
        classes, meta = ["cat-face", "heart"], {"label": "subgroup"}

    labels = item_labels(Subgroups(), ["grinning cat", "red", "xyzzy"], ["grinning cat", "red heart", "xyzzy blob"])
    assert labels == ["cat-face", "heart", None]


def test_eval_reports_legibility_at_chat_size_beside_the_real_images(judge):
    """`eval`'s judged figures: legibility of the samples and of the held-out real images (the ceiling), per
    theme and the worst; the report line says both, and an unlabelled run says it measured nothing."""
    from emoji_ldm.eval.evaluate import format_report, legibility_line
    from emoji_ldm.eval.judged import judge_report

    real = [_shape("red"), _shape("blue"), _shape("red", jitter=2), _shape("blue", jitter=-2)]
    heldout = {"source_url": [None] * 4, "title": [None] * 4, "tag": ["red", "blue", "red", "blue"], "image": real}
    samples = [_shape("red"), _shape("red"), _shape("red", jitter=1), _shape("blue")]  # the second is wrong
    nothing_retrieved = {"images": [None] * 4, "method": "none"}
    judged = judge_report(judge, heldout, samples, 1, None, nothing_retrieved, real_mode=False, seed=0)
    chat = judged["legibility"]
    assert chat["real"]["min"] == 1.0 and chat["real"]["labelled"] == 4
    assert set(chat["samples"]["themes"]) == set(THEMES) and chat["samples"]["min"] <= 0.75
    report = {"model": "/model", "dataset": "d@1", "samples": 4, "samples_per_caption": 1, "latent_table": "l@1",
              "inception_fid": None, "clip_score": None, "heldout_loss": None, "near_copy_share": None, **judged}
    text = format_report(report)
    assert "legibility at 22 px (samples | real" in text and "discord-dark" in text
    assert f"min {chat['samples']['min']:.1%} | 100.0%" in text
    unlabelled = {"samples": legibility(judge, samples, [None] * 4), "real": legibility(judge, real, [None] * 4)}
    assert "not computed" in legibility_line(unlabelled)
