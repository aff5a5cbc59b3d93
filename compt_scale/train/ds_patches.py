"""DeepSpeed without host syncs in the step: its ZeRO optimizers decide in Python whether the
gradient norm is finite (`is_invalid_grad_norm`: `bool(tensor)`), at every step, twice with gradient
clipping on. That read-back waits for the whole backward and the reduction before the optimizer's
kernels can even be queued.

Here the trainer's own on-device finiteness check (metrics.StepLosses, read at log/eval/save steps,
naming the first bad step; no checkpoint is ever written after an unchecked step) takes that role, as
DeepSpeed's `bf16.check_grad_overflow: false` intends (train/ds_config.py sets it): the check for a
tensor norm answers False without reading it. What that changes: a NaN gradient norm makes the clip
factor NaN, so the update, the parameters and the next loss are NaN, and the stage stops at the next
check naming that step; an infinite norm clips the update to zero. fp16 (which needs the skip-step
logic) is not a precision this project runs. Python-number norms keep DeepSpeed's check.
"""
from __future__ import annotations

import torch

_installed = False


def _no_read_back(original):
    def is_invalid_grad_norm(norm) -> bool:
        if torch.is_tensor(norm):
            return False
        return original(norm)
    is_invalid_grad_norm.compt_sync_free = True
    return is_invalid_grad_norm


def install() -> None:
    """Replace the check in the ZeRO-1/2 and ZeRO-3 optimizer modules (idempotent)."""
    global _installed
    if _installed:
        return
    from deepspeed.runtime.zero import stage3, stage_1_and_2
    for mod in (stage_1_and_2, stage3):
        if hasattr(mod, "is_invalid_grad_norm") and not getattr(mod.is_invalid_grad_norm, "compt_sync_free", False):
            mod.is_invalid_grad_norm = _no_read_back(mod.is_invalid_grad_norm)
    _installed = True
