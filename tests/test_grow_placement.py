"""Where insert / duplicate / stack put every source value: checked against views of each
architecture's tensors written out by hand here (not taken from the layout tables), per q/k/v block
and per head; everything else must equal the student's own init."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compt_scale.families.clip import build as build_clip
from compt_scale.grow import grow_state

COMMON = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}

# Per arch: src/tgt kwargs, the packed attention key (layer 'L'), and how to view it as a grid of
# (factor) axes for src and tgt. Heads grow 4 -> 8 (GQA llama: kv 2 -> 4, q per kv 2 -> 4, head_dim 8 -> 16).
CASES = {
    "llama": dict(
        src={"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_hidden_layers": 2, "head_dim": 8},
        tgt={"hidden_size": 64, "intermediate_size": 80, "num_attention_heads": 16, "num_key_value_heads": 4,
             "num_hidden_layers": 4, "head_dim": 16},
        key="model.layers.{}.self_attn.q_proj.weight",
        sview=(2, 2, 8, 32), tview=(4, 4, 16, 64),     # [kv, q-per-kv, head_dim, hidden]
        mlp=("model.layers.{}.mlp.down_proj.weight", (32, 48), (64, 80))),
    "qwen2": dict(
        src={"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_hidden_layers": 2},
        tgt={"hidden_size": 64, "intermediate_size": 80, "num_attention_heads": 8, "num_key_value_heads": 4,
             "num_hidden_layers": 4},
        key="model.layers.{}.self_attn.k_proj.bias", sview=(2, 8), tview=(4, 8),
        mlp=("model.layers.{}.mlp.up_proj.weight", (48, 32), (80, 64))),
    "gpt2": dict(
        src={"n_embd": 32, "n_inner": 48, "n_head": 4, "n_layer": 2, "n_positions": 16},
        tgt={"n_embd": 64, "n_inner": 80, "n_head": 8, "n_layer": 4, "n_positions": 32},
        key="transformer.h.{}.attn.c_attn.weight",
        sview=(32, 3, 4, 8), tview=(64, 3, 8, 8),       # Conv1D [hidden, (q|k|v), head, head_dim]
        mlp=("transformer.h.{}.mlp.c_fc.weight", (32, 48), (64, 80))),
    "gpt_neox": dict(
        src={"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_hidden_layers": 2},
        tgt={"hidden_size": 64, "intermediate_size": 80, "num_attention_heads": 8, "num_hidden_layers": 4},
        key="gpt_neox.layers.{}.attention.query_key_value.weight",
        sview=(4, 3, 8, 32), tview=(8, 3, 8, 64),       # [head, (q,k,v), head_dim, hidden]
        mlp=("gpt_neox.layers.{}.mlp.dense_4h_to_h.weight", (32, 48), (64, 80))),
    "opt": dict(
        src={"hidden_size": 32, "ffn_dim": 48, "num_attention_heads": 4, "num_hidden_layers": 2,
             "word_embed_proj_dim": 32, "max_position_embeddings": 16},
        tgt={"hidden_size": 64, "ffn_dim": 80, "num_attention_heads": 8, "num_hidden_layers": 4,
             "word_embed_proj_dim": 64, "max_position_embeddings": 30},
        key="model.decoder.layers.{}.self_attn.v_proj.weight", sview=(4, 8, 32), tview=(8, 8, 64),
        mlp=("model.decoder.layers.{}.fc1.weight", (48, 32), (80, 64))),
}


def expect_insert(src, student, sview, tview):
    exp = student.clone().reshape(tview)
    exp[tuple(slice(0, n) for n in sview)] = src.reshape(sview)
    return exp.reshape(student.shape)


def models(arch):
    c = CASES[arch]
    s_cfg = AutoConfig.for_model(arch, **COMMON, **c["src"])
    t_cfg = AutoConfig.for_model(arch, **COMMON, **c["tgt"])
    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(s_cfg).state_dict()
    torch.manual_seed(1)
    tgt = AutoModelForCausalLM.from_config(t_cfg).state_dict()
    return s_cfg, t_cfg, src, tgt


@pytest.mark.parametrize("depth,mapping", [("duplicate", [0, 0, 1, 1]), ("stack", [0, 1, 0, 1])])
@pytest.mark.parametrize("arch", sorted(CASES))
def test_insert_places_per_block_and_head(arch, depth, mapping):
    c = CASES[arch]
    s_cfg, t_cfg, src, student = models(arch)
    out, report = grow_state(src, s_cfg, t_cfg, student, width="insert", depth=depth)
    assert report["depth_map"]["layers"] == mapping
    assert set(out) == set(student) and all(out[k].shape == student[k].shape for k in out)
    mkey, ms, mt = c["mlp"]
    for j, i in enumerate(mapping):
        got = out[c["key"].format(j)]
        assert torch.equal(got, expect_insert(src[c["key"].format(i)], student[c["key"].format(j)],
                                              c["sview"], c["tview"]))
        assert torch.equal(out[mkey.format(j)], expect_insert(src[mkey.format(i)], student[mkey.format(j)], ms, mt))
    assert not any(v.data_ptr() == student[k].data_ptr() for k, v in out.items())   # fresh tensors


def test_insert_embeddings_positions_and_norms():
    s_cfg, t_cfg, src, student = models("gpt2")
    out, _ = grow_state(src, s_cfg, t_cfg, student, "insert", "duplicate")
    # learned positions 16 -> 32 rows: the source's rows in the leading block, new rows student's.
    assert torch.equal(out["transformer.wpe.weight"], expect_insert(src["transformer.wpe.weight"],
                                                                    student["transformer.wpe.weight"], (16, 32), (32, 64)))
    assert torch.equal(out["transformer.ln_f.weight"][:32], src["transformer.ln_f.weight"])
    assert torch.equal(out["transformer.ln_f.weight"][32:], student["transformer.ln_f.weight"][32:])
    assert out["lm_head.weight"] is out["transformer.wte.weight"]     # insert keeps tied weights tied


def test_zero_depth_keeps_source_order_and_zeroes_new_outputs():
    s_cfg, t_cfg, src, student = models("opt")
    out, report = grow_state(src, s_cfg, t_cfg, student, "insert", "zero")
    assert report["depth_map"]["layers"] == [0, 1, 1, 1] and report["zeroed_layers"]["layers"] == [2, 3]
    for j in (2, 3):
        for k in ("self_attn.out_proj.weight", "self_attn.out_proj.bias", "fc2.weight", "fc2.bias"):
            assert not out[f"model.decoder.layers.{j}.{k}"].any()
        q = f"model.decoder.layers.{j}.self_attn.q_proj.weight"
        assert torch.equal(out[q], expect_insert(src["model.decoder.layers.1.self_attn.q_proj.weight"],
                                                 student[q], (4, 8, 32), (8, 8, 64)))


def test_open_clip_in_proj_per_qkv_block_and_head():
    def cfg(vw, tw, th, layers):
        return {"embed_dim": 16,
                "vision_cfg": {"image_size": 16, "patch_size": 8, "width": vw, "layers": layers, "head_width": 8},
                "text_cfg": {"context_length": 8, "vocab_size": 40, "width": tw, "heads": th, "layers": layers}}
    s_cfg, t_cfg = cfg(32, 16, 2, 1), cfg(64, 32, 4, 3)
    src, student = build_clip(s_cfg, 0).state_dict(), build_clip(t_cfg, 1).state_dict()
    out, rep = grow_state(src, s_cfg, t_cfg, student, "insert", "duplicate")
    assert rep["depth_map"] == {"v": [0, 0, 0], "t": [0, 0, 0]}
    for j in range(3):
        k = f"visual.transformer.resblocks.{j}.attn.in_proj_weight"     # [(q|k|v), head, head_dim, width]
        assert torch.equal(out[k], expect_insert(src[k.replace(f".{j}.", ".0.")], student[k], (3, 4, 8, 32), (3, 8, 8, 64)))
        k = f"transformer.resblocks.{j}.attn.in_proj_bias"
        assert torch.equal(out[k], expect_insert(src[k.replace(f".{j}.", ".0.")], student[k], (3, 2, 8), (3, 4, 8)))
    assert torch.equal(out["visual.proj"], expect_insert(src["visual.proj"], student["visual.proj"], (32, 16), (64, 16)))
    assert torch.equal(out["logit_scale"], src["logit_scale"])
