"""compt_scale.flops against torch's FlopCounterMode on real transformers / open_clip models.

FlopCounterMode reports FLOPs = 2 x MACs. On CPU, SDPA runs `_scaled_dot_product_flash_attention_for_cpu`,
which torch's registry does not know (it would count attention as 0); we map it to torch's own SDPA
formulas (the ones used for the CUDA flash/efficient kernels), so the reference is what the counter
reports for the same model on GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from compt_scale.errors import CompTError
from compt_scale.families.clip import load_model_config
from compt_scale.families.hf_decoder import build, load_config
from compt_scale.flops import clip_macs, decoder_macs, stage_macs

aten = torch.ops.aten


def _sdpa_fwd(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, k, v)


CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd}


def counted_macs(fn) -> float:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        fn()
    return fc.get_total_flops() / 2


def rel_err(a, b):
    return abs(a - b) / b


DECODERS = [("llama-xs", {}, 32), ("llama-s", {}, 64), ("llama-s", {"num_key_value_heads": 2}, 48),
            ("gpt2-xs", {}, 64), ("gpt2-s", {}, 32)]


@pytest.mark.parametrize("preset,overrides,seq_len", DECODERS,
                         ids=["llama-xs", "llama-s", "llama-s-gqa", "gpt2-xs", "gpt2-s"])
def test_decoder_macs_match_flop_counter(preset, overrides, seq_len):
    cfg = load_config(preset, vocab_size=512, **overrides)
    model = build(cfg, seed=0)
    batch = 2
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    pred = decoder_macs(cfg, seq_len)
    tokens = batch * seq_len

    fwd = counted_macs(lambda: model(input_ids=ids, use_cache=False))

    def train_step():
        logits = model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids.reshape(-1)).backward()

    fwd_bwd = counted_macs(train_step)
    assert rel_err(pred["forward_per_token"] * tokens, fwd) < 0.02
    assert rel_err((pred["forward_per_token"] + pred["backward_per_token"]) * tokens, fwd_bwd) < 0.02
    assert pred["params"] == sum(p.numel() for p in model.parameters())
    assert pred["update_per_step"] == 3 * pred["params"]


def _clip_cfgs():
    import open_clip
    small = open_clip.get_model_config("ViT-S-16")  # the real preset, shrunk so CPU counts are quick
    small = copy.deepcopy(small)
    small["vision_cfg"].update(layers=2, image_size=64)
    small["text_cfg"].update(layers=2, context_length=24, vocab_size=1000)
    tiny = {"embed_dim": 48, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                            "head_width": 32, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 96, "heads": 3, "layers": 3}}
    return [("vit-s-16-shrunk", small, 4), ("tiny", tiny, 4), ("tiny-1cap", tiny, 1)]


@pytest.mark.parametrize("label,cfg,captions", _clip_cfgs(), ids=lambda x: x if isinstance(x, str) else "")
def test_clip_macs_match_flop_counter(label, cfg, captions):
    import open_clip
    torch.manual_seed(0)
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    size = cfg["vision_cfg"]["image_size"]
    image = torch.randn(1, 3, size, size)   # one sample = 1 image + M captions (paper, Table G)
    text = torch.randint(1, cfg["text_cfg"]["vocab_size"], (captions, cfg["text_cfg"]["context_length"]))
    pred = clip_macs(cfg, captions=captions)

    fwd = counted_macs(lambda: (model.encode_image(image), model.encode_text(text)))

    def train_step():
        i, t = model.encode_image(image), model.encode_text(text)
        (i.sum() + t.sum()).backward()

    fwd_bwd = counted_macs(train_step)
    assert rel_err(pred["forward_per_sample"], fwd) < 0.02
    assert rel_err(pred["forward_per_sample"] + pred["backward_per_sample"], fwd_bwd) < 0.02
    assert pred["params"] == sum(p.numel() for p in model.parameters())
    # C_b = 2 C_f - C_f(first layer) (+ SDPA's recompute): the image needs no gradient, so the patch
    # conv pays only its weight gradient.
    assert pred["first_layer"] > 0


def test_vit_b16_image_tower_matches_the_usual_figure():
    # ViT-B/16 at 224 is commonly quoted at ~17.6 GMACs; the text tower adds the same per caption.
    m = clip_macs(load_model_config("ViT-B-16"), captions=4)
    assert abs(m["image_forward"] / 1e9 - 17.56) < 0.05
    assert m["forward_per_sample"] == m["image_forward"] + 4 * m["text_forward_per_caption"]


def test_stage_macs_adds_teacher_forward_and_update():
    s, t = load_config("llama-s"), load_config("llama-xs")
    seq, tokens, steps = 64, 64_000, 100
    a, b = decoder_macs(s, seq), decoder_macs(t, seq)
    base = stage_macs(s, None, seq, tokens, steps)
    assert base["teacher_macs"] == 0
    assert base["train_macs"] == tokens * (a["forward_per_token"] + a["backward_per_token"]) + steps * 3 * a["params"]
    assert base["macs"] == base["train_macs"]
    ch = stage_macs(s, t, seq, tokens, steps)
    assert ch["teacher_macs"] == tokens * b["forward_per_token"]
    assert ch["macs"] == ch["train_macs"] + ch["teacher_macs"]
    # the IFD projection T (128 -> 64) is trained with the student: 3 x 128 x 64 MACs/token + its update
    assert ch["train_macs"] - base["train_macs"] == tokens * 3 * 128 * 64 + steps * 3 * (128 * 64 + 64)


def test_bad_inputs_raise_compterror():
    with pytest.raises(CompTError):
        decoder_macs(load_config("llama-xs"), 0)
    with pytest.raises(CompTError):
        clip_macs(load_model_config("ViT-B-16-SigLIP"))  # timm image tower
    with pytest.raises(CompTError):
        clip_macs(load_model_config("no-such-clip-model"))
    with pytest.raises(CompTError):
        clip_macs(load_model_config("ViT-B-16"), captions=0)
