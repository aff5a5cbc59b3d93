"""Analytical training MACs, following the paper's appendix C.2.

    C_t = C_f + C_b + C_u,   C_b = 2 C_f - C_f(first layer),   C_u = 3 x params (AdamW)

and CoM-PT adds the teacher's forward (the IFD targets). Everything here is MACs (multiply-accumulates);
`torch.utils.flop_counter.FlopCounterMode` reports FLOPs = 2 x MACs, and the tests hold these formulas
to that counter within 2% on real transformers / open_clip models.

What is counted, and why (so formula and counter agree):
- every matmul weight applied to every token (Linear, GPT-2's Conv1D, lm_head even when tied);
- attention's two matmuls (QK^T and AV) over the full sequence: SDPA kernels (and FlopCounterMode's
  formula for them) compute the whole T x T block, masking rather than skipping the causal half;
- not counted: embedding lookups (a gather, 0 MACs), norms, activations, softmax, bias adds, the
  loss - the counter ignores elementwise work too, and it is a few % at most of a transformer.

"First layer" in C_b: backward normally costs 2x forward per layer (grad w.r.t. the input and grad
w.r.t. the weights). The input of the first layer needs no gradient, so that layer pays only 1x.
For a ViT this is the patch-embedding conv (the image does not require grad; the counter then counts
only the conv's weight gradient). For a decoder the first layer is the token-embedding lookup: its
forward is 0 MACs, so C_b = 2 C_f exactly (the first attention block's input-gradient IS needed,
to reach the trainable embedding table).

One addition to the paper's 2x: fused SDPA kernels (flash / memory-efficient, what training runs on
GPU and CPU) do not keep the T x T probabilities; their backward recomputes QK^T, so attention's
backward is 2.5x its forward (5 matmuls vs 2). FlopCounterMode counts it that way too, so we add
ATTN_RECOMPUTE x attention-forward to C_b. With eager attention (probabilities stored) it would be 2x.
"""
from __future__ import annotations

import torch

from .errors import CompTError

ADAMW_UPDATE_MACS_PER_PARAM = 3
ATTN_RECOMPUTE = 0.5  # extra backward MACs of fused SDPA, as a fraction of attention's forward MACs

_DECODER_CACHE: dict[str, tuple[int, int]] = {}


def _decoder_shape(config) -> tuple[int, int]:
    """(params, matmul weight elements applied per token) from a meta-device model: no memory, and
    every HF decoder architecture (biases, GQA, fused qkv, tied heads) is handled without a table."""
    key = config.to_json_string()
    if key not in _DECODER_CACHE:
        from .meta import meta_decoder
        model = meta_decoder(config)
        params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        per_token = 0
        for m in model.modules():
            # Conv1D is GPT-2's transposed Linear ([in, out]); both are one matmul per token.
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
                per_token += m.weight.numel()
        if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
            raise CompTError(f"{config.model_type}: mixture-of-experts models are not supported by flops.py")
        _DECODER_CACHE[key] = (params, per_token)
    return _DECODER_CACHE[key]


def decoder_macs(config, seq_len: int) -> dict:
    """MACs of one token of an HF causal LM trained on sequences of `seq_len` tokens."""
    if seq_len <= 0:
        raise CompTError(f"seq_len must be positive, got {seq_len}")
    params, weights_per_token = _decoder_shape(config)
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    # QK^T and AV: each query token meets all seq_len keys, per head, per layer (not causally halved).
    attention = 2 * layers * seq_len * heads * head_dim
    forward = weights_per_token + attention
    first_layer = 0  # token-embedding lookup: no MACs (see module docstring)
    return {
        "params": params,
        "forward_per_token": forward,
        "backward_per_token": int(2 * forward - first_layer + ATTN_RECOMPUTE * attention),
        "update_per_step": ADAMW_UPDATE_MACS_PER_PARAM * params,
        "attention_per_token": attention,
        "seq_len": seq_len,
    }


def _hidden(config) -> int:
    return int(config.hidden_size)


def stage_macs(student_config, teacher_config, seq_len: int, tokens: int, steps: int) -> dict:
    """Training cost of one chain stage (or a baseline, teacher None).

    train_macs: student forward + backward over `tokens`, plus the AdamW update `steps` times; with a
    teacher it also includes the IFD projection T (student dim -> teacher dim), which is trained with
    the student (forward, backward incl. its input gradient, and its own update).
    teacher_macs: the frozen teacher's forward over the same tokens (no backward, no update).
    """
    if tokens < 0 or steps < 0:
        raise CompTError(f"tokens and steps must be >= 0, got {tokens}, {steps}")
    s = decoder_macs(student_config, seq_len)
    train = tokens * (s["forward_per_token"] + s["backward_per_token"]) + steps * s["update_per_step"]
    teacher = 0
    if teacher_config is not None:
        t = decoder_macs(teacher_config, seq_len)
        teacher = tokens * t["forward_per_token"]
        proj = _hidden(student_config) * _hidden(teacher_config)
        train += tokens * 3 * proj + steps * ADAMW_UPDATE_MACS_PER_PARAM * (proj + _hidden(teacher_config))
    return {"train_macs": int(train), "teacher_macs": int(teacher), "macs": int(train + teacher)}


# ------------------------------------------------------------------ CLIP (open_clip ViT towers)

def _tower_layer(width: int, mlp_ratio: float, tokens: int) -> tuple[int, int]:
    """(all MACs, attention-matmul MACs) of one open_clip ResidualAttentionBlock on `tokens` tokens:
    qkv + out proj (4 W^2) and MLP (2 W x mlp) per token, and attention's QK^T and AV (2 tokens W)."""
    mlp = int(width * mlp_ratio)
    attention = 2 * tokens * tokens * width
    return tokens * (4 * width * width + 2 * width * mlp) + attention, attention


def clip_macs(cfg: dict, image_size=None, captions: int = 4) -> dict:
    """MACs of one CLIP training sample in the paper's convention (Table G): 1 image + M captions.

    Supports open_clip's own ViT image tower and text transformer (not timm/HF towers, not ResNets,
    not attentional pooling); patch dropout is assumed off.
    """
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg:
        raise CompTError("clip_macs needs an open_clip model-config dict (families.clip.load_model_config)")
    v, t, embed = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"]), int(cfg["embed_dim"])
    if captions < 1:
        raise CompTError(f"--captions must be >= 1, got {captions}")
    for key in ("timm_model_name", "hf_model_name"):
        if v.get(key) or t.get(key):
            raise CompTError(f"CLIP config uses {key}: only open_clip's own ViT/text towers are supported")
    if not isinstance(v.get("layers", 12), int):
        raise CompTError("CLIP config has a ResNet image tower: only ViT towers are supported")
    if v.get("attentional_pool") or t.get("embed_cls"):
        raise CompTError("CLIP config uses attentional pooling / a text cls token: not supported")
    size = image_size if image_size is not None else v.get("image_size", 224)
    ih, iw = (size, size) if isinstance(size, int) else tuple(size)
    patch = v.get("patch_size", 16)
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    vw, vl, vmlp = int(v.get("width", 768)), int(v.get("layers", 12)), float(v.get("mlp_ratio", 4.0))
    n_patches = (ih // ph) * (iw // pw)
    patch_embed = n_patches * 3 * ph * pw * vw  # conv1: the image tower's first layer
    v_layer, v_attn = _tower_layer(vw, vmlp, n_patches + 1)  # + the class token
    image = patch_embed + vl * v_layer + vw * embed  # proj on the pooled token

    tw, tl, tmlp = int(t.get("width", 512)), int(t.get("layers", 12)), float(t.get("mlp_ratio", 4.0))
    ctx = int(t.get("context_length", 77))
    text_proj = 0 if (t.get("proj_type", "linear") == "none") else tw * embed  # on the pooled token
    t_layer, t_attn = _tower_layer(tw, tmlp, ctx)
    text = tl * t_layer + text_proj

    forward = image + captions * text
    attention = vl * v_attn + captions * tl * t_attn
    params = clip_param_count(cfg, (ih, iw))
    return {
        "params": params,
        "image_forward": image,
        "text_forward_per_caption": text,
        "forward_per_sample": forward,
        "first_layer": patch_embed,
        # The text tower's first layer is the token-embedding lookup (0 MACs), so only conv1 saves.
        "backward_per_sample": int(2 * forward - patch_embed + ATTN_RECOMPUTE * attention),
        "update_per_step": ADAMW_UPDATE_MACS_PER_PARAM * params,
        "captions": captions,
        "image_size": (ih, iw),
    }


def decoder_param_count(config) -> int:
    """Parameters of an HF decoder (tied weights once), from the cached meta-device build."""
    return _decoder_shape(config)[0]


def clip_param_count(cfg: dict, image_size) -> int:
    """Exact parameter count of the open_clip model, built on the meta device (no memory)."""
    import open_clip
    v = dict(cfg["vision_cfg"], image_size=tuple(image_size))
    with torch.device("meta"):
        model = open_clip.model.CLIP(cfg["embed_dim"], v, cfg["text_cfg"],
                                     quick_gelu=cfg.get("quick_gelu", False))
    return sum(p.numel() for p in model.parameters())


def human(n: float, unit: str = "") -> str:
    """1.23G-style formatting for tables (MACs, params)."""
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"
