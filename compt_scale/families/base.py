"""The family contract: everything the chain runner, planner and report need from a model family,
as one typed object. A family module builds one `Family` from its functions (`Family.from_module`);
nothing outside a family branches on which family it is. tests/test_family_contract.py runs every
registered family through this contract.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

Config = Any    # a transformers PretrainedConfig (decoders) or an open_clip model-config dict (CLIP)
Batch = tuple   # tensors, as the family's dataset returns them


@dataclass(frozen=True)
class Family:
    name: str
    budget_unit: str                                          # what one sample of `tokens:` counts
    # True: students are built partitioned (ZeRO-3) and grown, taught and exported one parameter at a
    # time through HF safetensors (chain/weights.py); False: in memory (small models: CLIP towers).
    partitioned_io: bool
    # ---- models
    preset_names: Callable[[], list[str]]
    load_config: Callable[[str], Config]                      # preset name / config path / model dir
    plan_config: Callable[[Any, Any], Config]                 # (spec, stage): before any data exists
    model_config: Callable[[Any, Any, Path], Config]          # (spec, stage, data_dir): what is built
    param_count: Callable[[Config], int]
    build: Callable[[Config, int], Any]                       # (config, seed): the student's own init
    config_of: Callable[[Any], Config]
    load_export: Callable[[Path], Any]
    export: Callable[[Any, dict, Path, Path], None]           # (model, state, data_dir, out)
    # ---- objective
    feature_dims: Callable[[Config], list[int]]               # one width per IFD feature stream
    losses: Callable[[Any, Batch], tuple]                     # student: (task loss, [features])
    features: Callable[[Any, Batch], list]                    # teacher: [features]
    probe: Callable[[Any, Batch], Any]                        # outputs tests compare exports with
    ifd_heads: Callable[[Config, Config, Any], list]          # (student, teacher, IFDSpec): the T maps
    evaluate: Callable[[Any, Any, Path, float], dict]         # (model, spec, data_dir, val_loss): extra metrics
    # ---- data and cost
    prepare: Callable[[Any, Path], Path]                      # (spec, data_dir) -> prepared data dir
    dataset: Callable[[Any, Path, str], Any]                  # (spec, data_dir, split): `.batch(idx)`
    tokens_per_sample: Callable[[Any], int]
    stage_macs: Callable[[Config, Config | None, Any, int], dict]   # one optimizer step
    flops_per_token: Callable[[Config, Any], float]           # model FLOPs per budget unit (MFU)
    memory_shape: Callable[[Config, Any], tuple]              # ([(tokens, hidden, heads, layers)], largest param)
    # ---- memory and speedups
    enable_activation_checkpointing: Callable[[Any], None]    # non-reentrant, works under ZeRO-3
    liger_supported: Callable[[Config], bool]                 # liger-kernel has patches for it
    apply_liger: Callable[[Any], None]
    validate_chain: Callable[[Any], None]                     # config-level checks, one-line errors

    @classmethod
    def from_module(cls, module, **values) -> Family:
        """The family whose fields are the module's attributes of the same names (a family module
        ends with `FAMILY = Family.from_module(sys.modules[__name__], name=..., budget_unit=...)`)."""
        names = [f.name for f in fields(cls) if f.name not in values]
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            raise TypeError(f"family module {module.__name__} lacks {', '.join(missing)}")
        return cls(**values, **{n: getattr(module, n) for n in names})

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if str(f.type).startswith("Callable") and not callable(v):
                raise TypeError(f"family {self.name}: {f.name} is not callable")
