"""Model families registered by name. The stage runner is generic; a family module provides:

  validate_chain(spec)                         config-level checks before anything runs
  prepare(spec, data_dir) -> data_dir          build/reuse the prepared data
  model_config(spec, stage, data_dir)          the stage's model config
  plan_config(spec, stage), param_count(cfg)   the same before any data exists (the planner)
  build(config, seed) -> model                 fresh init (the student's own init for growth)
  config_of(model), feature_dims(config)       IFD feature streams and their widths
  losses(model, batch) -> (task, [features])   the student's forward
  features(model, batch) -> [features]         the teacher's forward
  dataset(spec, data_dir, split)               `.batch(indices)` -> tuple of tensors, `len()`
  tokens_per_sample(spec), stage_macs(student_cfg, teacher_cfg, spec, samples)
  load_export(path), export(model, state, data_dir, out), probe(model, batch)
  evaluate(model, spec, data_dir, val_loss) -> dict  extra eval metrics (CLIP: zero-shot, retrieval)
Growth goes through the shared registry (compt_scale.grow) with the family's layout tables.
"""
from __future__ import annotations

import importlib

from ..errors import CompTError

FAMILIES = {"hf_decoder": "compt_scale.families.hf_decoder",
            "open_clip": "compt_scale.families.clip_family"}


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


def get_family(name: str):
    if name not in FAMILIES:
        raise CompTError(f"unknown family {name!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name])
