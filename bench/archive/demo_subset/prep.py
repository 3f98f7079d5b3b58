"""Prep: base twemoji at 32 px RGBA, names, groups, subgroups, captions -> /tmp/exp/data.npz"""
import io, hashlib, json, sys
import numpy as np
from PIL import Image
sys.path.insert(0, "/work/main")
from emoji_ldm.sources.twemoji import twemoji_items
from emoji_ldm.imaging import model_pixels
from emoji_ldm.caption.metadata import describe
from emoji_ldm.eval.judge import row_label
sk = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
X, names, tags, caps, subs, held, urls = [], [], [], [], [], [], []
for it in twemoji_items():
    from pathlib import Path
    p = Path(it.locator)
    if sk & set(p.stem.split("-")):
        continue
    b = p.read_bytes()
    img = Image.open(io.BytesIO(b))
    X.append(np.round((model_pixels(img, 32, 4, None) + 1) * 127.5).astype(np.uint8))
    names.append(it.title); tags.append(it.tag); urls.append(it.source_url)
    caps.append(describe(b, it.title, it.tag))
    subs.append(row_label("subgroup", it.source_url, it.title, it.tag) or "")
    held.append(int(hashlib.sha256(X[-1].tobytes()).hexdigest()[:8], 16) % 100 < 10)
np.savez_compressed("/tmp/exp/data.npz", X=np.stack(X), held=np.array(held))
json.dump(dict(names=names, tags=tags, caps=caps, subs=subs, urls=urls), open("/tmp/exp/meta.json", "w"))
print(len(X), caps[:3], subs[:3])
