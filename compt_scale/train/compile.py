"""`train.compile`: torch.compile per transformer block with fullgraph=True, as torchtitan does.

Why per block and not the model: the step never calls the student's own `__call__` (the loss runs the
base model and the LM head chunk by chunk, families/hf_decoder.py `losses`), so compiling the model
object compiled nothing that ran. Each block's `forward` is replaced by its compiled version (an
instance attribute; parameter names, checkpoints and exports unchanged). The module's `__call__`
(with its hooks) stays eager, so DeepSpeed ZeRO-3's gather/release hooks run around the compiled
forward instead of inside the graph: the same code works for ZeRO-0..3 and for activation
checkpointing (HF's checkpointing layer wraps `__call__`). All blocks of a model share one compiled
code object (same class, same shapes): dynamo compiles once and reuses the graph for the others
(guards on the parameters' shapes, not their identity: inline_inbuilt_nn_modules).

fullgraph=True: a graph break in a block is an error at the first step, not a silent slow path.
Mask creation, embeddings and the loss stay eager: they are cheap, and the mask builder branches on
values in Python (that would graph-break or hard-code a mask).

`train.compile: auto` (the default) compiles on CUDA and not on CPU: on a GPU this is what a user
expects; on CPU inductor's C++ compile costs minutes for a few steps of a tiny model and tests and
the demo would pay it for nothing. COMPT_COMPILE_BACKEND picks another dynamo backend (tests use
`aot_eager`: the same tracing, graph-break and autograd checks, without inductor's code generation).
"""
from __future__ import annotations

import os

import torch
from torch import nn


def wanted(mode: bool | str) -> bool:
    """train.compile: true / false / auto (on CUDA only)."""
    return torch.cuda.is_available() if mode == "auto" else bool(mode)


def backend() -> str:
    return os.environ.get("COMPT_COMPILE_BACKEND", "inductor")


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's stacks of repeated blocks: ModuleLists whose members all have one class and
    that hold no such list themselves (decoder layers; each CLIP tower's residual blocks)."""
    found = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            found.append(mod)
    inner = [lst for lst in found if not any(o is not lst and any(o is m for m in lst.modules()) for o in found)]
    return inner


def compile_blocks(model: nn.Module, fullgraph: bool = True) -> int:
    """Compile each block's forward in place; returns how many blocks were compiled."""
    n = 0
    for stack in block_lists(model):
        for block in stack:
            if getattr(block, "_compt_compiled", False):
                continue
            block.forward = torch.compile(block.forward, fullgraph=fullgraph, backend=backend())
            block._compt_compiled = True
            n += 1
    return n
