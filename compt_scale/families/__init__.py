"""Model families registered by name. A family module provides: load_config, build, forward_features,
param_count, hidden_size, validate_chain."""
from __future__ import annotations

import importlib

from ..errors import CompTError

FAMILIES = {"hf_decoder": "compt_scale.families.hf_decoder"}


def get_family(name: str):
    if name not in FAMILIES:
        raise CompTError(f"unknown family {name!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name])
