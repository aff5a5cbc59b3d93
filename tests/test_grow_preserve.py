"""Function-preserving growth (width clone + depth zero) checked by the real forward of every
architecture: 2x hidden, 2x ffn, 2x heads, 2x kv heads, 2x layers; logits/embeddings equal."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compt_scale.grow import grow_state

# (model_type, source kwargs, target kwargs) -- tiny shapes, fp32.
ARCHS = {
    "llama": ({"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_hidden_layers": 2},
              {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8, "num_key_value_heads": 4,
               "num_hidden_layers": 4}),
    "mistral": ({"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "num_hidden_layers": 2, "head_dim": 8},
                {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8, "num_key_value_heads": 4,
                 "num_hidden_layers": 4, "head_dim": 8}),
    "qwen2": ({"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_hidden_layers": 2},
              {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8, "num_key_value_heads": 4,
               "num_hidden_layers": 4}),
    "gpt2": ({"n_embd": 32, "n_inner": 48, "n_head": 4, "n_layer": 2, "n_positions": 32},
             {"n_embd": 64, "n_inner": 96, "n_head": 8, "n_layer": 4, "n_positions": 32}),
    "gpt_neox": ({"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_hidden_layers": 2,
                  "rotary_pct": 0.5},
                 {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8, "num_hidden_layers": 4,
                  "rotary_pct": 0.5}),
    "opt": ({"hidden_size": 32, "ffn_dim": 48, "num_attention_heads": 4, "num_hidden_layers": 2,
             "word_embed_proj_dim": 32, "max_position_embeddings": 32},
            {"hidden_size": 64, "ffn_dim": 96, "num_attention_heads": 8, "num_hidden_layers": 4,
             "word_embed_proj_dim": 64, "max_position_embeddings": 32}),
}
COMMON = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def make_config(mt, kw, **extra):
    return AutoConfig.for_model(mt, **COMMON, **kw, **extra)


def build(cfg, seed):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()


def randomize_norms(model, seed):
    """Fresh norms are ones/zeros; random ones make the check see norm placement errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_clone_zero_preserves_logits(arch):
    s_kw, t_kw = ARCHS[arch]
    src_cfg, tgt_cfg = make_config(arch, s_kw), make_config(arch, t_kw, tie_word_embeddings=False)
    src = build(src_cfg, 0)
    randomize_norms(src, 1)
    tgt = build(tgt_cfg, 2)
    state, report = grow_state(src.state_dict(), src_cfg, tgt_cfg, tgt.state_dict(), width="clone", depth="zero")
    assert report["zeroed_layers"]["layers"] == [2, 3]
    tgt.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = src(ids).logits, tgt(ids).logits
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_clone_noise_breaks_symmetry_keeps_function(arch):
    s_kw, t_kw = ARCHS[arch]
    src_cfg, tgt_cfg = make_config(arch, s_kw), make_config(arch, t_kw, tie_word_embeddings=False)
    src, tgt = build(src_cfg, 0), build(tgt_cfg, 2)
    plain, _ = grow_state(src.state_dict(), src_cfg, tgt_cfg, tgt.state_dict(), "clone", "zero")
    noisy, rep = grow_state(src.state_dict(), src_cfg, tgt_cfg, tgt.state_dict(), "clone", "zero",
                            noise_snr=100.0, generator=torch.Generator().manual_seed(0))
    k = "model.layers.0.mlp.down_proj.weight" if arch == "llama" else "transformer.h.0.mlp.c_proj.weight"
    d = noisy[k] - plain[k]
    assert d.abs().max() > 0
    snr = plain[k].pow(2).mean() / d.pow(2).mean()
    assert 30 < snr < 300   # about the requested 100 (zero-sum projection removes a fraction)
    tgt.load_state_dict(noisy)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (src(ids).logits - tgt(ids).logits).abs().max() < 1e-4


def test_tied_clone_is_untied_and_reported():
    s_kw, t_kw = ARCHS["gpt2"]
    src_cfg, tgt_cfg = make_config("gpt2", s_kw), make_config("gpt2", t_kw)   # GPT-2 ties by default
    src, tgt = build(src_cfg, 0), build(tgt_cfg, 2)
    state, report = grow_state(src.state_dict(), src_cfg, tgt_cfg, tgt.state_dict(), "clone", "zero")
    assert report["untied_embeddings"] and report["config_changes"] == {"tie_word_embeddings": False}
    assert not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    untied = build(make_config("gpt2", t_kw, **report["config_changes"]), 2)
    untied.load_state_dict(state)
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        assert (src(ids).logits - untied(ids).logits).abs().max() < 1e-4


def clip_cfg(v_width, t_width, t_heads, layers, embed=16):
    return {"embed_dim": embed,
            "vision_cfg": {"image_size": 16, "patch_size": 8, "width": v_width, "layers": layers,
                           "head_width": 8, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 8, "vocab_size": 40, "width": t_width, "heads": t_heads,
                         "layers": layers, "mlp_ratio": 2.0}}


def test_open_clip_clone_zero_preserves_embeddings():
    from compt_scale.families.clip import build as build_clip

    s_cfg, t_cfg = clip_cfg(32, 16, 2, 2), clip_cfg(64, 32, 4, 4)
    src = build_clip(s_cfg, 0).eval()
    randomize_norms(src, 1)
    tgt = build_clip(t_cfg, 2).eval()
    state, report = grow_state(src.state_dict(), s_cfg, t_cfg, tgt.state_dict(), "clone", "zero")
    assert report["zeroed_layers"] == {"v": [2, 3], "t": [2, 3]}
    tgt.load_state_dict(state)
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    txt = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (src.encode_image(img) - tgt.encode_image(img)).abs().max() < 1e-4
        assert (src.encode_text(txt) - tgt.encode_text(txt)).abs().max() < 1e-4
