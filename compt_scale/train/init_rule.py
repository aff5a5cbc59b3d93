"""`train.zero_init_residual`: a student trained from scratch starts with the output projection of
every residual branch at zero (attention o_proj / out_proj, MLP down_proj / c_proj, their biases).

Each block is then the identity at step 0 and the model starts as embeddings -> final norm -> head;
the branches grow in from there (torchvision's `zero_init_residual`, Goyal et al. 2017; SkipInit,
De & Smith 2020). Why the demo uses it: Hugging Face initializes every matrix at normal(0, 0.02)
whatever the width, so at step 0 a branch's output grows with the width while the embeddings stay
at 0.02: the 4.3M demo model starts with a residual stream of random branch output, and with the
smaller hidden-matrix rate of the width rule (train/lr_rule.py) it learned more slowly per token
than the 12x smaller xs for its first ~160k tokens (README, "What `make demo` does").

Which tensors are residual outputs is the growth layouts' `res` flag (grow/layouts/), so the rule
is one function for every family the growth registry knows. Only from-scratch students are
touched: a grown student's weights come from its source. Under ZeRO-3 each rank zeroes its own
shard (zeroing is element-wise, nothing to gather).
"""
from __future__ import annotations

import torch

from ..grow.layouts import get_layout


def residual_output_names(module: torch.nn.Module, config) -> list[str]:
    """The parameters of `module` the family's layout marks as residual output projections."""
    layout = get_layout(config)
    return [name for name, _ in module.named_parameters() if layout.match(name)[1].res]


@torch.no_grad()
def zero_residual_outputs(module: torch.nn.Module, config) -> list[str]:
    """Zero every residual output projection of a freshly built `module` (whole or ZeRO-3
    partitioned); returns their names, for the manifest."""
    names = residual_output_names(module, config)
    params = dict(module.named_parameters())
    for name in names:
        p = params[name]
        p.data.zero_()
        if hasattr(p, "ds_tensor"):   # ZeRO-3: p.data is an empty placeholder, the shard is ds_tensor
            p.ds_tensor.zero_()
    return names


def describe(train, grown: bool, source: str | None = None) -> str:
    """How a stage's student starts (StagePlan.init: what `plan` prints and the manifest records)."""
    if grown:
        return f"grown from {source}" if source else "grown"
    if train.zero_init_residual:
        return "the family's default init, residual output projections zeroed (train.zero_init_residual)"
    return "the family's default init"
