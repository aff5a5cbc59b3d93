"""The shared expansion registry: generic width/depth growth operators over per-architecture
layouts (compt_scale/families/layouts.py, compt_scale/families/clip.py).

- grow_state: in-memory state dict -> state dict (+ JSON-able report).
- check_growable: config-only check, one-line CompTError.
- grow_hf_checkpoint: streaming over safetensors shards, tensor by tensor.
- grow_into_model: in place into a live (possibly ZeRO-3 partitioned) model, parameter by parameter.
"""
from .registry import DEPTH_OPS, WIDTH_OPS, check_growable, depth_map, grow_state
from .stream import SafetensorsReader, grow_hf_checkpoint
from .zero3 import grow_into_model

__all__ = ["grow_state", "check_growable", "grow_hf_checkpoint", "grow_into_model", "SafetensorsReader",
           "depth_map", "WIDTH_OPS", "DEPTH_OPS"]
