"""Targets derived by factors (grow/targets.py) vs hand-written expected configs; growth through the
registry on the derived pair; the CLI factors and a chain stage's `grow_to:`; bad factors -> one line."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compt_scale.chain.resolve import load_resolved as load_chain
from compt_scale.cli import main
from compt_scale.errors import CompTError
from compt_scale.grow import grow_state
from compt_scale.grow.targets import derive_config, derive_target
from conftest import write_spec


def _sizes(cfg, keys):
    return {k: getattr(cfg, k) for k in keys}


LLAMA_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "num_hidden_layers", "head_dim")


def test_llama_gqa_2x_2x_matches_hand_config():
    src = AutoConfig.for_model("llama", vocab_size=64, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=176, num_hidden_layers=2)
    got = derive_config(src, {"width": "2x", "depth": "2x"})
    # by hand: head_dim 16 and 2 q heads per kv head kept, MLP ratio 176/64 kept
    want = AutoConfig.for_model("llama", vocab_size=64, hidden_size=128, num_attention_heads=8,
                                num_key_value_heads=4, intermediate_size=352, num_hidden_layers=4)
    assert _sizes(got, LLAMA_KEYS) == _sizes(want, LLAMA_KEYS)
    assert got.vocab_size == 64


def test_llama_multiple_of_256_and_hidden_override():
    # TinyLlama-like: 2048 hidden, 32 heads, 4 kv heads, 5632 = 22 x 256 MLP
    src = AutoConfig.for_model("llama", vocab_size=320, hidden_size=2048, num_attention_heads=32,
                               num_key_value_heads=4, intermediate_size=5632, num_hidden_layers=4)
    got = derive_config(src, {"width": "1.5x"})
    # 3072 hidden, 48 heads, 6 kv heads; 5632 * 1.5 = 8448 = 33 x 256 already a multiple
    assert _sizes(got, LLAMA_KEYS) == {"hidden_size": 3072, "num_attention_heads": 48, "num_key_value_heads": 6,
                                       "intermediate_size": 8448, "num_hidden_layers": 4, "head_dim": 64}
    got = derive_config(src, {"width": "1.25x"})
    # 2560 hidden, 40 heads, 5 kv; 5632 * 1.25 = 7040 -> rounded up to 28 x 256 = 7168
    assert (got.hidden_size, got.num_attention_heads, got.num_key_value_heads, got.intermediate_size) == \
        (2560, 40, 5, 7168)
    got = derive_config(src, {"hidden_size": 4096, "depth": 2})
    assert _sizes(got, LLAMA_KEYS) == {"hidden_size": 4096, "num_attention_heads": 64, "num_key_value_heads": 8,
                                       "intermediate_size": 11264, "num_hidden_layers": 8, "head_dim": 64}
    got = derive_config(src, {"width": 2, "intermediate_size": 12288})   # explicit wins
    assert got.intermediate_size == 12288 and got.hidden_size == 4096


@pytest.mark.parametrize("depth_op,types", [
    ("duplicate", ["full_attention", "full_attention", "sliding_attention", "sliding_attention",
                   "sliding_attention", "sliding_attention"]),
    ("stack", ["full_attention", "sliding_attention", "sliding_attention",
               "full_attention", "sliding_attention", "sliding_attention"]),
    # new layers left at their own init (no source layer) take the type at their relative depth j*3//6
    ("constant", ["full_attention", "sliding_attention", "sliding_attention",
                  "sliding_attention", "sliding_attention", "sliding_attention"]),
    ("interval", ["full_attention", "full_attention", "sliding_attention", "sliding_attention",
                  "sliding_attention", "sliding_attention"]),
])
def test_qwen2_layer_types_extended_by_the_depth_map(depth_op, types):
    src = AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, num_hidden_layers=3, use_sliding_window=True,
                               sliding_window=8, max_window_layers=1)
    assert src.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    got = derive_config(src, {"depth": "2x"}, depth_op)
    assert got.num_hidden_layers == 6 and got.layer_types == types
    assert (got.hidden_size, got.num_attention_heads, got.num_key_value_heads) == (32, 4, 2)


def test_gpt2_names():
    src = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=64, n_head=2, n_layer=2, n_inner=256, n_positions=64)
    got = derive_config(src, {"width": "2x", "depth": "3x"})
    assert (got.n_embd, got.n_head, got.n_layer, got.n_inner, got.n_positions) == (128, 4, 6, 512, 64)
    src = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=64, n_head=2, n_layer=2, n_positions=64)
    assert derive_config(src, {"width": "2x"}).n_inner is None    # "4 x n_embd" stays implicit


def test_neox_and_opt_names():
    neox = {"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
            "num_hidden_layers": 2}
    assert derive_target(neox, "2x", "2x") == {**neox, "hidden_size": 128, "num_attention_heads": 8,
                                                "intermediate_size": 512, "num_hidden_layers": 4}
    opt = {"model_type": "opt", "hidden_size": 64, "num_attention_heads": 4, "ffn_dim": 256,
           "num_hidden_layers": 2, "word_embed_proj_dim": 64}
    assert derive_target(opt, 2, 1) == {**opt, "hidden_size": 128, "num_attention_heads": 8, "ffn_dim": 512,
                                        "word_embed_proj_dim": 128}


@pytest.mark.parametrize("grow_to,msg", [
    ({"width": "0.5x"}, "factor must be >= 1"),
    ({"width": "twice"}, "expected a factor like 2x"),
    ({"depth": "1.5x"}, "num_hidden_layers 2 x 1.5 = 3 is not"),   # 2 x 1.5 = 3 is fine: see below
    ({"width": "1.5x"}, "num_attention_heads 1 x 1.5"),
    ({"hiden_size": 128}, "unknown config field"),
])
def test_bad_factor_is_one_line(grow_to, msg):
    src = AutoConfig.for_model("llama", vocab_size=64, hidden_size=64, num_attention_heads=1,
                               num_key_value_heads=1, intermediate_size=176, num_hidden_layers=2)
    if grow_to == {"depth": "1.5x"}:
        assert derive_config(src, grow_to).num_hidden_layers == 3
        return
    with pytest.raises(CompTError, match=msg) as e:
        derive_config(src, grow_to)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("width,depth", [("insert", "duplicate"), ("clone", "zero")])
def test_registry_grows_the_derived_pair(width, depth):
    src_cfg = AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
                                   tie_word_embeddings=False)
    tgt_cfg = derive_config(src_cfg, {"width": "2x", "depth": "2x"}, depth)
    torch.manual_seed(0)
    src, tgt = AutoModelForCausalLM.from_config(src_cfg).eval(), AutoModelForCausalLM.from_config(tgt_cfg).eval()
    state, report = grow_state(src.state_dict(), src_cfg, tgt_cfg, tgt.state_dict(), width, depth)
    tgt.load_state_dict(state)
    assert report["sizes"]["hidden"] == [32, 64] and report["sizes"]["layers"] == [2, 4]
    if (width, depth) == ("clone", "zero"):   # function-preserving pair: the same logits
        ids = torch.randint(0, 64, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(tgt(ids).logits, src(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture
def hf_src(tmp_path):
    cfg = AutoConfig.for_model("llama", vocab_size=256, hidden_size=32, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=96, num_hidden_layers=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_cli_factors(hf_src, tmp_path, capsys):
    out = tmp_path / "grown"
    assert main(["grow", "--from", str(hf_src), "--width-factor", "2x", "--depth-factor", "2x",
                 "--set", "rms_norm_eps=1e-3", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"],
            cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 4, 2, 192, 4, 256)
    assert AutoModelForCausalLM.from_pretrained(out).config.rms_norm_eps == 1e-3
    capsys.readouterr()
    for argv, msg in [(["--width-factor", "2y"], "expected a factor"),
                      (["--to", "llama-s", "--depth-factor", "2x"], "not both"),
                      (["--set", "nonsense"], "expected FIELD=VALUE"), ([], "--to: missing")]:
        assert main(["grow", "--from", str(hf_src), "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and msg in err, err
        assert not (tmp_path / "x").exists()


def test_chain_stage_grow_to(tmp_path):
    from compt_scale.chain.planner import plan_rows
    from compt_scale.families.hf_decoder import load_config, param_count
    stages = [{"name": "s", "model": "llama-xs", "tokens": 1024},
              {"name": "m", "grow_to": {"width": "2x", "depth": "2x"}, "tokens": 1024},
              {"name": "l", "grow_to": {"width": "2x"}, "tokens": 1024}]
    spec = load_chain(write_spec(tmp_path / "c.yaml", stages))
    rows = plan_rows(spec)
    # llama-xs: 64 hidden, 2 heads, 176 MLP, 2 layers -> by hand 128/4/352/4 -> 256/8/704/4
    want_m = load_config("llama-xs", vocab_size=512, hidden_size=128, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=352, num_hidden_layers=4)
    want_l = load_config("llama-xs", vocab_size=512, hidden_size=256, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=704, num_hidden_layers=4)
    assert [r["params"] for r in rows[1:]] == [param_count(want_m), param_count(want_l)]
    for bad, msg in [({"name": "m", "model": "llama-s", "grow_to": {"width": 2}, "tokens": 1}, "not both"),
                     ({"name": "m", "grow_to": {"width": "2y"}, "tokens": 1}, "stages[1].grow_to.width"),
                     ({"name": "m", "grow_to": {"width": "1.25x"}, "tokens": 1}, "stages[1].grow_to: num_attention_heads"),
                     ({"name": "m", "tokens": 1}, "stages[1].model: required")]:
        with pytest.raises(CompTError, match=msg.replace("[", r"\[").replace("]", r"\]")) as e:
            load_chain(write_spec(tmp_path / "bad.yaml", [stages[0], bad]))
        assert "\n" not in str(e.value)
    with pytest.raises(CompTError, match="needs a predecessor"):
        load_chain(write_spec(tmp_path / "bad.yaml", [stages[1]]))
