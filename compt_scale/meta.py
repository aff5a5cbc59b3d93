"""Decoders built on the meta device: every shape and parameter count of a transformers model with
no memory and no table per architecture. The one place that builds them (flops, planning, streaming
growth all read shapes from here)."""
from __future__ import annotations

import torch


def meta_decoder(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
