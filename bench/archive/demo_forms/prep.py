"""everyday Twemoji (as make demo) at 32 px RGBA, captions, held-out flag -> /tmp/exp2/data.npz"""
import io, hashlib, json, sys
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/infra")
from demo_twemoji import has_skin_tone, everyday_subgroups, EVERYDAY_GROUPS
from emoji_ldm.sources.twemoji import twemoji_items
from emoji_ldm.imaging import model_pixels, clean_image, ImageConfig
from emoji_ldm.store.splits import split_of
from emoji_ldm.caption.metadata import describe
from emoji_ldm.eval.judge_net import row_label
subs_keep = everyday_subgroups()
X, names, caps, subs, held = [], [], [], [], []
for it in twemoji_items():
    p = Path(it.locator)
    if has_skin_tone(p.stem):
        continue
    g = row_label("group", it.source_url, it.title, it.tag); s = row_label("subgroup", it.source_url, it.title, it.tag)
    if not (g in EVERYDAY_GROUPS or s in subs_keep):
        continue
    b = p.read_bytes()
    c = clean_image(b, ImageConfig())
    X.append(np.round((model_pixels(Image.open(io.BytesIO(c.png)), 32, 4, None) + 1) * 127.5).astype(np.uint8))
    names.append(it.title); caps.append(describe(c.png, it.title, it.tag)); subs.append(s or "")
    held.append(split_of(c.id) == 'val')
np.savez_compressed("/tmp/exp2/data.npz", X=np.stack(X), held=np.array(held))
json.dump(dict(names=names, caps=caps, subs=subs), open("/tmp/exp2/meta.json", "w"))
print(len(X), X[0].shape, caps[:2])
