"""Opt-in speed-ups applied to the student and teacher before the DeepSpeed engine is built.

- `train.liger: auto | on | off`: liger-kernel's Triton RMSNorm / SwiGLU / RoPE and fused linear
  cross-entropy for HF Llama-family decoders. `auto` uses it only when the device is CUDA and the
  package is installed (checked without importing it, so CPU runs never touch it); `on` insists and
  says in one line why it cannot. liger ships as the optional `[gpu]` extra.
- `train.compile: auto | true | false`: `torch.compile` of every transformer block of the student and
  of the teacher, fullgraph (train/compile.py; auto: on CUDA only). The IFD projection stays eager: on
  CUDA it is its own fused kernel.
"""
from __future__ import annotations

import importlib.util

import torch

from ..errors import CompTError
from .compile import compile_blocks
from .compile import wanted as compile_wanted


def liger_wanted(mode: str, family, config, zero_stage: int) -> bool:
    """Whether to apply liger; raises a one-line CompTError when `on` cannot be honoured."""
    if mode == "off":
        return False
    cuda = torch.cuda.is_available()
    reasons = []
    if not family.liger_supported(config):
        reasons.append(f"model type {getattr(config, 'model_type', type(config).__name__)!r} is not a "
                       "liger-supported HF Llama-family decoder")
    if not cuda:
        reasons.append("no CUDA device (liger's kernels are Triton GPU kernels)")
    elif importlib.util.find_spec("liger_kernel") is None:
        reasons.append("liger-kernel is not installed (pip install 'compt-scale[gpu]')")
    if zero_stage == 3:
        # The fused loss reads the LM head's weight outside the head's forward: ZeRO-3 would not gather it.
        reasons.append("ZeRO-3 partitions the LM head the fused loss reads")
    if mode == "auto":
        return not reasons
    if reasons:
        raise CompTError(f"train.liger: on, but {reasons[0]}; use liger: auto or off")
    return True


def apply_speedups(student: torch.nn.Module, teacher, train, family, config, zero_stage: int) -> dict:
    """Apply liger / compile per `train` (a TrainSpec); returns what was applied, for the log."""
    liger = liger_wanted(train.liger, family, config, zero_stage)
    if liger:
        family.apply_liger(student)
        if teacher is not None:
            family.apply_liger(teacher.model)
    compiled = compile_wanted(train.compile)
    if compiled:
        compile_blocks(student)
        if teacher is not None:
            teacher.compile()
    return {"liger": liger, "compile": compiled}
