"""Model families registered by name. Each is one typed `Family` (families/base.py) built by its
module; the stage runner, planner and report talk only to that contract. This module is torch-free:
the family modules (which import torch and their libraries) load only when a family is asked for.
Growth goes through the shared registry (compt_scale.grow) with the layout tables under grow/layouts.
"""
from __future__ import annotations

import importlib

from ..config import ImageTextDataSpec, TextDataSpec
from ..errors import CompTError
from .base import Family

FAMILIES = {"hf_decoder": "compt_scale.families.hf_decoder",
            "open_clip": "compt_scale.families.clip_family"}
# The `data:` section each family reads (config.py parses the section with it).
DATA_SPECS = {"hf_decoder": TextDataSpec, "open_clip": ImageTextDataSpec}


def check_successor(spec, i: int, cfg, prev_cfg, param_count) -> None:
    """The chain rule every family shares: stage i is strictly larger than stage i-1 and can be grown
    from it with the stage's operators. Raises a one-line CompTError naming stages[i].model."""
    from ..grow import check_growable

    stage, pred = spec.stages[i], spec.stages[i - 1]
    where = f"stages[{i}].model"
    if param_count(cfg) <= param_count(prev_cfg):
        raise CompTError(f"{where}: {stage.model!r} is not larger than its predecessor {pred.model!r}")
    g = spec.growth_for(stage)
    try:
        check_growable(prev_cfg, cfg, width=g.width, depth=g.depth)
    except CompTError as e:
        raise CompTError(f"{where}: cannot grow from {pred.model!r}: {e}") from None


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise CompTError(f"unknown family {name!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name]).FAMILY
