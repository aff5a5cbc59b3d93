"""open_clip CLIP towers as a growth layout (growth data: what each tensor's axes are).

Configs are open_clip model-config dicts ({"embed_dim", "vision_cfg", "text_cfg"}). Both towers are
standard open_clip transformers whose attention is nn.MultiheadAttention, so q/k/v are packed as
in_proj_weight [3 * heads * head_dim, width]. Vision factors are prefixed "v.", text ones "t.";
"embed" is the shared joint embedding dim.
"""
from __future__ import annotations

import dataclasses

from ...errors import CompTError
from ..layout import Layout

# Options that change which tensors exist or what they mean; the layout covers the plain towers.
_UNSUPPORTED_V = {"timm_model_name": None, "attentional_pool": False, "ls_init_value": None,
                  "qk_norm": False, "scale_heads": False, "scale_attn": False, "scale_fc": False,
                  "scaled_cosine_attn": False, "scale_attn_inner": False, "block_type": None,
                  "no_ln_pre": False, "pos_embed_type": "learnable"}
_UNSUPPORTED_T = {"hf_model_name": None, "ls_init_value": None, "qk_norm": False, "scale_heads": False,
                  "scale_attn": False, "scale_fc": False, "scaled_cosine_attn": False,
                  "scale_attn_inner": False, "block_type": None, "embed_cls": False, "proj_bias": False,
                  "proj_type": "linear"}


def _full(cfg: dict):
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    v = dataclasses.asdict(CLIPVisionCfg(**cfg.get("vision_cfg", {})))
    t = dataclasses.asdict(CLIPTextCfg(**cfg.get("text_cfg", {})))
    return v, t


def check_supported(cfg: dict) -> None:
    if "embed_dim" not in cfg or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise CompTError("open_clip model config needs embed_dim, vision_cfg and text_cfg")
    try:
        v, t = _full(cfg)
    except TypeError as e:
        raise CompTError(f"open_clip model config: {e}") from None
    if isinstance(v["layers"], (list, tuple)):
        raise CompTError("open_clip ModifiedResNet vision towers have no growth layout (ViT only)")
    for tower, d, bad in (("vision_cfg", v, _UNSUPPORTED_V), ("text_cfg", t, _UNSUPPORTED_T)):
        for k, default in bad.items():
            if d.get(k, default) != default:
                raise CompTError(f"open_clip {tower}.{k}={d[k]!r} has no growth layout (plain towers only)")


def _sizes(cfg: dict) -> dict[str, int]:
    v, t = _full(cfg)
    if v["width"] % v["head_width"] or t["width"] % t["heads"]:
        raise CompTError("open_clip width must be divisible by head_width (vision) / heads (text)")
    return {
        "embed": cfg["embed_dim"],
        "v.hidden": v["width"], "v.heads": v["width"] // v["head_width"], "v.hd": v["head_width"],
        "v.ffn": int(v["width"] * v["mlp_ratio"]), "v": v["layers"],
        "t.hidden": t["width"], "t.heads": t["heads"], "t.hd": t["width"] // t["heads"],
        "t.ffn": int(t["width"] * t["mlp_ratio"]), "t.vocab": t["vocab_size"], "t": t["layers"],
    }


def _tower(prefix: str, ns: str) -> dict[str, str]:
    b = f"{prefix}transformer.resblocks.{{{ns}}}."
    h, f, qkv = f"{ns}.hidden", f"{ns}.ffn", f"3*{ns}.heads*{ns}.hd"   # in_proj rows: [q | k | v]
    return {
        b + "ln_1.weight": f"o:{h} | norm", b + "ln_1.bias": f"o:{h}",
        b + "ln_2.weight": f"o:{h} | norm", b + "ln_2.bias": f"o:{h}",
        b + "attn.in_proj_weight": f"o:{qkv}, i:{h}",
        b + "attn.in_proj_bias": f"o:{qkv}",
        b + "attn.out_proj.weight": f"o:{h}, i:{ns}.heads*{ns}.hd | res",
        b + "attn.out_proj.bias": f"o:{h} | res",
        b + "mlp.c_fc.weight": f"o:{f}, i:{h}", b + "mlp.c_fc.bias": f"o:{f}",
        b + "mlp.c_proj.weight": f"o:{h}, i:{f} | res", b + "mlp.c_proj.bias": f"o:{h} | res",
    }


CLIP_TENSORS = {
    "logit_scale": "",
    "logit_bias": "",
    "visual.conv1.weight": "o:v.hidden, o:_, o:_, o:_",   # [width, 3, patch, patch]
    "visual.class_embedding": "o:v.hidden",
    "visual.positional_embedding": "o:_, o:v.hidden",     # [grid^2 + 1, width]: grid must match
    "visual.ln_pre.weight": "o:v.hidden | norm", "visual.ln_pre.bias": "o:v.hidden",
    "visual.ln_post.weight": "o:v.hidden | norm", "visual.ln_post.bias": "o:v.hidden",
    "visual.proj": "i:v.hidden, o:embed",                  # used as x @ proj
    **_tower("visual.", "v"),
    "token_embedding.weight": "o:t.vocab, o:t.hidden",
    "positional_embedding": "o:_, o:t.hidden",             # [context_length, width]
    "ln_final.weight": "o:t.hidden | norm", "ln_final.bias": "o:t.hidden",
    "text_projection": "i:t.hidden, o:embed",
    **_tower("", "t"),
}

CLIP_LAYOUT = Layout("open_clip", _sizes, CLIP_TENSORS, stacks=("v", "t"), is_tied=lambda cfg: False)
