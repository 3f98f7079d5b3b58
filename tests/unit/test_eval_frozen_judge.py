"""The frozen judge: the committed artifact is the judge its content id names, it is small, it was made from the
pack the way `pack_rows` splits it today, and its training loop is deterministic (two runs, the same bytes).

Rebuilding the artifact itself takes minutes on one thread (`emoji-ldm train-judge --out DIR` prints whether
its content id is the committed one), so the suite checks the loop's determinism on a small problem instead."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from emoji_ldm.errors import UserError
from emoji_ldm.eval.fit import fit_judge
from emoji_ldm.eval.frozen_judge import frozen_dir, frozen_judge, pack_rows
from emoji_ldm.eval.judge import JudgeConfig
from emoji_ldm.eval.judge_net import content_id, load_judge


def test_the_committed_judge_is_the_one_its_content_id_names():
    judge = frozen_judge()
    recorded = json.loads((frozen_dir() / "judge.json").read_text())
    assert judge.meta["content_id"] == recorded["content_id"] == content_id(judge.net.state_dict(), recorded)
    assert judge.meta["uri"] == "frozen:twemoji-subgroup-v1" and judge.meta["label"] == "subgroup"
    size = sum(p.stat().st_size for p in frozen_dir().iterdir())
    assert size <= 2_200_000, size  # shipped inside the package
    assert recorded["val_accuracy"] > 3 * recorded["majority_baseline"], recorded["val_accuracy"]


def test_a_judge_that_is_not_its_recorded_one_is_refused(tmp_path):
    folder = tmp_path / "judge"
    shutil.copytree(frozen_dir(), folder)
    meta = json.loads((folder / "judge.json").read_text())
    (folder / "judge.json").write_text(json.dumps({**meta, "classes": meta["classes"][::-1]}))
    with pytest.raises(UserError, match=r"judge.pt and judge.json are not the judge recorded there"):
        load_judge(str(folder))
    del meta["content_id"]  # a judge saved before content ids: its id is computed on load
    (folder / "judge.json").write_text(json.dumps(meta))
    assert load_judge(str(folder)).meta["content_id"] == frozen_judge().meta["content_id"]


def test_the_pack_splits_as_the_committed_judge_was_made():
    """The held-out emoji of the artifact are those `pack_rows` holds out (the demo dataset's, by content id);
    a skin-tone variant never trains beside its held-out base emoji."""
    rows = pack_rows(32, "subgroup")
    held_out = sorted(s for s, sp in zip(rows["stem"], rows["split"]) if sp == "val")
    assert held_out == json.loads((frozen_dir() / "judge.json").read_text())["val_stems"]
    tones = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
    training_bases = {"-".join(p for p in s.split("-") if p not in tones)
                      for s, sp in zip(rows["stem"], rows["split"]) if sp == "train"}
    assert not training_bases & set(held_out)
    assert rows["pixels"].shape[1:] == (32, 32, 3) and len(rows["label"]) > 3500


def test_the_training_loop_is_deterministic():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    labels = [["a", "b", "c"][i % 3] for i in range(48)]
    config = JudgeConfig(out="/unused", image_size=16, width=4, epochs=2, batch_size=16, threads=2)
    threads = torch.get_num_threads()
    ids = []
    for _ in range(2):
        net, meta = fit_judge(config, (pixels[:40], labels[:40]), (pixels[40:], labels[40:]), deterministic=True)
        ids.append(content_id(net.state_dict(), meta))
    assert ids[0] == ids[1]
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()  # restored


def test_a_tag_judge_needs_a_dataset():
    with pytest.raises(UserError, match="--label tag needs --data"):
        JudgeConfig(out="/x", label="tag")
