"""Model families registered by name. Each is one typed `Family` (families/base.py) built by its
module; the stage runner, planner and report talk only to that contract. This module is torch-free:
the family modules (which import torch and their libraries) load only when a family is asked for.
Growth goes through the shared registry (compt_scale.grow) with the layout tables under grow/layouts.
"""
from __future__ import annotations

import importlib

from ..config import DATA_SPECS, FAMILY_MODULES, DataSpec, load_env_families
from ..errors import CompTError
from .base import Family

FAMILIES = FAMILY_MODULES   # name -> module holding the family's FAMILY (the same dict as config's)


def register_family(name: str, module: str, data_spec: type[DataSpec]) -> None:
    """Make family `name` (the module `module`, ending with `FAMILY = Family.from_module(...)`) usable
    in chain specs as `family: name`, with `data_spec` as its `data:` section."""
    FAMILY_MODULES[name] = module
    DATA_SPECS[name] = data_spec


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
    load_env_families()   # families from outside the package ($COMPT_SCALE_FAMILIES, config.py)
    if name not in FAMILIES:
        raise CompTError(f"unknown family {name!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name]).FAMILY
