"""The shared expansion registry: generic width/depth growth operators over per-architecture
layouts (compt_scale/grow/layouts/).

- grow_state: in-memory state dict -> state dict (+ JSON-able report).
- check_growable: config-only check, one-line CompTError.
- grow_hf_checkpoint: streaming over safetensors shards, tensor by tensor.
- grow_into_model: in place into a live (possibly ZeRO-3 partitioned) model, parameter by parameter.

Names are imported on first use, so the torch-free parts (`grow.ops`) load without torch.
"""
import importlib

from .ops import DEPTH_OPS, WIDTH_OPS

_WHERE = {"grow_state": "registry", "check_growable": "registry", "depth_map": "registry",
          "grow_hf_checkpoint": "stream", "SafetensorsReader": "stream", "grow_into_model": "zero3"}

__all__ = ["grow_state", "check_growable", "grow_hf_checkpoint", "grow_into_model", "SafetensorsReader",
           "depth_map", "WIDTH_OPS", "DEPTH_OPS"]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
