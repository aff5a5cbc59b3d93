"""The streaming path (`grow_hf_checkpoint`, over a saved safetensors dir) and the in-memory path
(`grow_state`, over the live model's state dict) give identical tensors for every layout, and the
streaming path is function-preserving for clone + zero through the real HF forward."""
import pytest
import torch
from test_grow_preserve import ARCHS, build, make_config, randomize_norms
from transformers import AutoModelForCausalLM

from compt_scale.grow import SafetensorsReader, grow_hf_checkpoint, grow_state, stream
from compt_scale.grow.layouts import get_layout

# GPT-NeoX with full and partial rotary (rotary_pct < 1 is in ARCHS already).
CASES = {**ARCHS, "gpt_neox_full_rotary": ({**ARCHS["gpt_neox"][0], "rotary_pct": 1.0, "hidden_size": 48},
                                           {**ARCHS["gpt_neox"][1], "rotary_pct": 1.0, "hidden_size": 96})}


def _pair(case):
    arch = case.split("_full")[0]
    s_kw, t_kw = CASES[case]
    return arch, make_config(arch, s_kw), make_config(arch, t_kw, tie_word_embeddings=False)


@pytest.mark.parametrize("width,depth", [("clone", "zero"), ("insert", "duplicate"), ("insert", "stack")])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stream_equals_in_memory(case, width, depth, tmp_path):
    arch, src_cfg, tgt_cfg = _pair(case)
    src = build(src_cfg, 0)
    randomize_norms(src, 1)
    src.save_pretrained(tmp_path / "src")
    grow_hf_checkpoint(tmp_path / "src", tgt_cfg, tmp_path / "out", width, depth, seed=7)
    streamed = SafetensorsReader(tmp_path / "out")
    # the in-memory path from the same source, starting from the streaming path's documented init
    shapes, _ = stream.target_tensors(tgt_cfg)
    lay = get_layout(tgt_cfg)
    student = {k: stream.student_init(k, lay.match(k)[1], s, torch.float32, tgt_cfg, 7) for k, s in shapes}
    ref, _ = grow_state(src.state_dict(), src_cfg, tgt_cfg, student, width, depth)
    assert set(streamed) == set(ref), set(streamed) ^ set(ref)
    for k in ref:
        assert torch.equal(streamed[k], ref[k]), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_stream_clone_zero_preserves_logits(case, tmp_path):
    arch, src_cfg, tgt_cfg = _pair(case)
    src = build(src_cfg, 0)
    randomize_norms(src, 1)
    src.save_pretrained(tmp_path / "src")
    grow_hf_checkpoint(tmp_path / "src", tgt_cfg, tmp_path / "out", "clone", "zero")
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float().eval()
    assert grown.config.num_hidden_layers == 2 * src_cfg.num_hidden_layers
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (src(ids).logits - grown(ids).logits).abs().max() < 1e-4
