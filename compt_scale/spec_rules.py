"""Spec rules across sections, checked when a chain spec is loaded (one line each, exit 2)."""
from __future__ import annotations

from .errors import CompTError


def check_init_rules(spec) -> None:
    """`init:` starts a chain (its first stage) or a baseline from a saved model. A later stage is
    grown from its predecessor's export, so an `init:` there would be silently ignored: refused.
    A tokenizer trained here would not be the one the init: model was trained with: refused."""
    for i, stage in enumerate(spec.stages[1:], start=1):
        if stage.init:
            raise CompTError(f"stages[{i}].init: only the first stage (or a baseline) can start from an init: "
                             f"model; stage {stage.name!r} is grown from {spec.stages[i - 1].name!r}'s export "
                             f"(make it the first stage of its own chain, or drop init:)")
    inits = [s for s in spec.stages + spec.baselines if s.init]
    if inits and getattr(spec.data, "tokenizer", None) == "train":
        raise CompTError(f"data.tokenizer: 'train' would give the init: model {inits[0].init} a tokenizer it was "
                         f"not trained with; leave data.tokenizer out (or 'auto': the init dir's own)")
