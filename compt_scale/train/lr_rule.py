"""A fair learning rate per model size: muP's Adam rule from one tuned base (Yang et al. 2022, Table 3).

With `train.lr_base_width: W0` a model of hidden size W trains its hidden matrices (attention and MLP
projections, and the IFD projection T) at train.lr * W0 / W, while what muP keeps width-independent
keeps train.lr: the embeddings (token and position), the output head, norms and biases. W0 need not be
a model of the chain: the demo uses lr 1.2e-2 with W0 = 16, i.e. embeddings at 1.2e-2 and xs's
(W = 64) hidden matrices at 3e-3, the two rates its sweep found (README, "What `make demo` does").
The chain's models and their independent baselines go through the same rule (both are stages of
one spec), so a baseline is never handicapped by a rate tuned for a smaller model. Without
`lr_base_width` every parameter gets `train.lr` (the old behaviour).

What this is not: full muP also rescales the initialization and the output logits (1/W multiplier);
here only the learning rates are scaled, the models keep Hugging Face's own init (or start their
residual branches at zero: `train.zero_init_residual`, train/init_rule.py, which the demo adds because
HF's width-independent init std made its wide baseline slow to start). The rule is applied to
decoders (hidden_size); other families reject it with one line.
"""
from __future__ import annotations

import torch

from ..errors import CompTError


def hidden_lr(train, config, family: str = "hf_decoder") -> float:
    """The learning rate of the hidden matrices of a model with `config` under `train`'s rule."""
    if train.lr_base_width is None:
        return train.lr
    width = getattr(config, "hidden_size", None)
    if family != "hf_decoder" or not width:
        raise CompTError(f"train.lr_base_width: the width-scaled learning rate is for hf_decoder models "
                         f"(hidden_size), not {family}")
    return train.lr * train.lr_base_width / int(width)


def describe(train, config, family: str = "hf_decoder") -> dict:
    """What the manifest and the report record: base lr, hidden-matrix lr, and the rule that set it."""
    hid = hidden_lr(train, config, family)
    if train.lr_base_width is None:
        rule = "train.lr for every parameter"
    else:
        rule = (f"muP-style: hidden matrices lr x {train.lr_base_width}/{int(config.hidden_size)} "
                f"(train.lr_base_width); embeddings, head, norms at train.lr")
    return {"lr": train.lr, "hidden_lr": hid, "lr_rule": rule}


def _unscaled_ids(module: torch.nn.Module) -> set[int]:
    """Parameters muP keeps at the base rate: every embedding table and the output head."""
    ids = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for m in module.modules():
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        if head is not None:
            ids.update(id(p) for p in head.parameters())
    return ids


def param_groups(module: torch.nn.Module, train, config, family: str = "hf_decoder") -> list[dict]:
    """AdamW groups: weight decay on matrices only (as GPT/Llama recipes), and under the width rule the
    hidden matrices in their own group with their own lr (LambdaLR scales each group's lr alike)."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decay = [p for _, p in trainable if p.dim() >= 2]
    no_decay = [p for _, p in trainable if p.dim() < 2]
    if train.lr_base_width is None:
        return [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    unscaled = _unscaled_ids(module)
    hidden = [p for p in decay if id(p) not in unscaled]
    base = [p for p in decay if id(p) in unscaled]
    groups = [{"params": base, "weight_decay": train.weight_decay},
              {"params": hidden, "weight_decay": train.weight_decay, "lr": hidden_lr(train, config, family)},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
