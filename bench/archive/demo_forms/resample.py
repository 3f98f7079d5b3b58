"""Re-sample a saved exp model: python resample.py '{"name": "B800", ...same arch cfg..., "tag": "g3", "guidance": 3, "form": "short|full"}'"""
import json, sys
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.dirname(__file__)); sys.path.insert(0, "/work/main")
import exp
from diffusers import DDPMScheduler, UNet2DConditionModel
from emoji_ldm.models.builders import encode_text, load_text_encoder
from emoji_ldm.models.presets import get_preset
from emoji_ldm.eval.naming import NAMING
from emoji_ldm.inference.prompts import model_prompt

cfg = json.loads(sys.argv[1]); torch.set_num_threads(2)
d = np.load("/tmp/exp2/data.npz"); m = json.load(open("/tmp/exp2/meta.json")); X8 = d["X"]
naming_idx = [m["names"].index(x) for x in NAMING]
L = cfg.get("L", 16)
tok, te = load_text_encoder(get_preset("pixel32", {"text.max_length": str(L)}))
prompts = [m["caps"][i] for i in naming_idx] if cfg.get("form") == "full" else [model_prompt(x, "metadata") for x in NAMING]
with torch.no_grad():
    empty = encode_text(tok, te, [""], L)[0][0]; ptext = encode_text(tok, te, prompts, L)[0]
p = cfg.get("patch", 4); C, S = 4 * p * p, 32 // p
blocks = tuple(cfg.get("blocks", (64, 128)))
unet = UNet2DConditionModel(sample_size=S, in_channels=C, out_channels=C, block_out_channels=blocks, layers_per_block=cfg.get("lpb", 1),
    down_block_types=tuple(cfg.get("down", ("CrossAttnDownBlock2D", "DownBlock2D"))), up_block_types=tuple(cfg.get("up", ("UpBlock2D", "CrossAttnUpBlock2D"))),
    cross_attention_dim=384, attention_head_dim=8, **({'addition_embed_type': 'text', 'addition_embed_type_num_heads': 8} if cfg.get('addtext') else {}), norm_num_groups=min(32, min(blocks)))
unet.load_state_dict(torch.load(f"/tmp/exp2/{cfg['name']}.pt")); unet.eval()
noise = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=cfg.get("pred", "sample"))
out = dict(cfg); out["name"] = cfg["name"] + "-" + cfg["tag"]
exp.sample(out, unet, noise, ptext, empty, C, S, p, X8, naming_idx)
