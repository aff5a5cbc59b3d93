"""The chain step between parsing a spec and using it: `config.py` only parses and validates the
YAML; here the models are resolved through the spec's family (presets exist, each successor is
larger and growable, vocab fits) and budgets are filled from `budget:` (the paper's rule 3)."""
from __future__ import annotations

from pathlib import Path

from ..config import ChainSpec, load_chain


def resolve(spec: ChainSpec) -> ChainSpec:
    """Model-level checks, then the spec with its budgets filled (a new value; `spec` is unchanged).
    Idempotent."""
    from ..families import get_family
    from .planner import with_budgets
    get_family(spec.family).validate_chain(spec)
    return with_budgets(spec)


def load_resolved(path: str | Path) -> ChainSpec:
    """What every command runs on: the parsed spec, resolved."""
    return resolve(load_chain(path))
