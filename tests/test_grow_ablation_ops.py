"""The paper's growth ablations (App. D.1, Fig. A): width `interpolate`, depth `constant` and `interval`,
placed on tiny tensors against values written out by hand, and run through grow_state for a decoder
and a CLIP pair."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from compt_scale.families.clip import build as build_clip
from compt_scale.grow import depth_map, grow_state
from compt_scale.grow.axes import Source, factor_sizes, parse_spec, place


def _place(src, tgt_shape, spec_text, src_sizes, tgt_sizes):
    spec = parse_spec(spec_text)
    out = torch.full(tgt_shape, -99.0)
    place(out, Source(src), spec, factor_sizes(spec, src_sizes, tuple(src.shape), "s"),
          factor_sizes(spec, tgt_sizes, tgt_shape, "t"), "interpolate")
    return out


def test_interpolate_by_hand():
    # 3 -> 5 points, half-pixel centres: x = (j + .5) * 3/5 - .5 = -.2 (clamped), .4, 1, 1.6, 2.2 (clamped)
    out = _place(torch.tensor([0.0, 1.0, 2.0]), (5,), "o:hidden", {"hidden": 3}, {"hidden": 5})
    torch.testing.assert_close(out, torch.tensor([0.0, 0.4, 1.0, 1.6, 2.0]))
    # A packed dim (3 blocks x hidden 2 -> 4): each block interpolated on its own, never across blocks.
    src = torch.tensor([1.0, 3.0, 10.0, 20.0, -1.0, -5.0])
    out = _place(src, (12,), "o:3*hidden", {"hidden": 2}, {"hidden": 4})
    blocks = [[a, a + .25 * (b - a), a + .75 * (b - a), b] for a, b in ((1, 3), (10, 20), (-1, -5))]
    torch.testing.assert_close(out, torch.tensor([v for blk in blocks for v in blk]))
    # A matrix: bilinear, as torch computes it.
    m = torch.arange(12.0).reshape(3, 4)
    out = _place(m, (5, 6), "o:ffn, i:hidden", {"ffn": 3, "hidden": 4}, {"ffn": 5, "hidden": 6})
    ref = F.interpolate(m[None, None], size=(5, 6), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(out, ref)


def test_depth_maps_by_hand():
    assert depth_map("constant", 2, 4) == [(0, False), (1, False), (None, False), (None, False)]
    assert depth_map("interval", 2, 4) == [(0, False), (None, False), (1, False), (None, False)]
    assert depth_map("interval", 2, 3) == [(0, False), (None, False), (1, False)]
    assert depth_map("interval", 3, 3) == [(0, False), (1, False), (2, False)]
    # interval places each source layer where duplicate first copies it
    dup = depth_map("duplicate", 4, 6)
    for j, (i, _) in enumerate(depth_map("interval", 4, 6)):
        if i is not None:
            assert dup[j][0] == i and (j == 0 or dup[j - 1][0] != i)


def _llama(**kw):
    cfg = AutoConfig.for_model("llama", vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                               num_attention_heads=4, num_key_value_heads=2, **kw)
    torch.manual_seed(kw["num_hidden_layers"])
    return cfg, AutoModelForCausalLM.from_config(cfg).state_dict()


@pytest.mark.parametrize("depth", ["constant", "interval"])
def test_depth_ops_through_grow_state_decoder_and_clip(depth):
    s_cfg, s_state = _llama(hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8)
    t_cfg, t_state = _llama(hidden_size=32, intermediate_size=48, num_hidden_layers=4, head_dim=8)
    out, rep = grow_state(s_state, s_cfg, t_cfg, t_state, "insert", depth)
    src_of = {"constant": [0, 1, None, None], "interval": [0, None, 1, None]}[depth]
    key = "model.layers.{}.mlp.down_proj.weight"
    for j, i in enumerate(src_of):
        torch.testing.assert_close(out[key.format(j)], s_state[key.format(i)] if i is not None else t_state[key.format(j)])
    assert rep["init_layers"]["layers"] == [j for j, i in enumerate(src_of) if i is None]

    from compt_scale.families.clip_family import load_config
    sc, tc = load_config("clip-xs"), load_config("clip-xs")
    tc = {**tc, "vision_cfg": {**tc["vision_cfg"], "layers": 4}}
    src, stu = build_clip(sc, 1).state_dict(), build_clip(tc, 2).state_dict()
    out, _ = grow_state(src, sc, tc, stu, "insert", depth)
    key = "visual.transformer.resblocks.{}.mlp.c_fc.weight"
    for j, i in enumerate(src_of):
        torch.testing.assert_close(out[key.format(j)], src[key.format(i)] if i is not None else stu[key.format(j)])


def test_interpolate_through_grow_state_decoder_and_clip():
    s_cfg, s_state = _llama(hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8)
    t_cfg, t_state = _llama(hidden_size=48, intermediate_size=64, num_hidden_layers=2, head_dim=8)
    out, _ = grow_state(s_state, s_cfg, t_cfg, t_state, "interpolate", "duplicate")
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in t_state.items()}
    k = "model.layers.0.mlp.down_proj.weight"   # [hidden, ffn]: bilinear over the whole matrix
    ref = F.interpolate(s_state[k][None, None], size=(48, 64), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(out[k], ref)
    k = "model.norm.weight"
    ref = F.interpolate(s_state[k][None, None], size=48, mode="linear", align_corners=False)[0, 0]
    torch.testing.assert_close(out[k], ref)

    from compt_scale.families.clip_family import load_config
    sc, tc = load_config("clip-xs"), load_config("clip-s")
    src, stu = build_clip(sc, 1).state_dict(), build_clip(tc, 2).state_dict()
    out, _ = grow_state(src, sc, tc, stu, "interpolate", "duplicate")
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in stu.items()}
    k = "ln_final.weight"
    ref = F.interpolate(src[k][None, None], size=stu[k].shape[0], mode="linear", align_corners=False)[0, 0]
    torch.testing.assert_close(out[k], ref)
    torch.testing.assert_close(out["logit_scale"], src["logit_scale"])
