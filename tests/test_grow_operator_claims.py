"""Each README statement about what a growth operator preserves, measured through the real forward
of a small Llama and GPT-2 (fp32, eager attention):

- width `clone` + depth `zero`: the grown model computes exactly the source's function;
- width `clone` with the depth unchanged (any depth operator is then the identity map): exact;
- width `insert` with the width unchanged + depth `zero`: exact (insert only copies);
- depth `duplicate` or `stack` (new layers are copies that run again): NOT preserved;
- width `insert` that enlarges the width (new units keep the student's random init): NOT preserved.
"""
import pytest
import torch
from test_grow_preserve import ARCHS, build, make_config, randomize_norms

from compt_scale.grow import grow_state

ARCH_NAMES = ("llama", "gpt2")
LAYERS = {"llama": "num_hidden_layers", "gpt2": "n_layer"}


def _logit_diff(arch, width, depth, same_width=False, same_depth=False) -> float:
    s_kw, t_kw = ARCHS[arch]
    t_kw = dict(s_kw if same_width else t_kw)
    t_kw[LAYERS[arch]] = s_kw[LAYERS[arch]] * (1 if same_depth else 2)
    src_cfg, tgt_cfg = make_config(arch, s_kw), make_config(arch, t_kw, tie_word_embeddings=False)
    src = build(src_cfg, 0)
    randomize_norms(src, 1)
    with torch.no_grad():       # weights large enough that every layer visibly changes the logits
        for p in src.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    tgt = build(tgt_cfg, 2)
    state, _ = grow_state(src.state_dict(), src_cfg, tgt_cfg, tgt.state_dict(), width, depth)
    tgt.load_state_dict(state)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = src(ids).logits, tgt(ids).logits
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_clone_zero_is_exact(arch):
    assert _logit_diff(arch, "clone", "zero") < 1e-5


@pytest.mark.parametrize("depth", ["duplicate", "stack", "zero"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_clone_same_depth_is_exact(arch, depth):
    assert _logit_diff(arch, "clone", depth, same_depth=True) < 1e-5


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_zero_same_width_insert_is_exact(arch):
    assert _logit_diff(arch, "insert", "zero", same_width=True) < 1e-5


@pytest.mark.parametrize("width", ["clone", "insert"])
@pytest.mark.parametrize("depth", ["duplicate", "stack"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_duplicate_and_stack_change_the_function(arch, depth, width):
    assert _logit_diff(arch, width, depth, same_width=width == "insert") > 0.05


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_widening_insert_changes_the_function(arch):
    assert _logit_diff(arch, "insert", "zero") > 0.05
