"""The family contract: everything the chain runner, planner and report need from a model family.

A family is one `Family` value built from its module (`Family.from_module`). Its fields are grouped by
the small Protocols below (model I/O, models, objective, data and cost); each field's type is the exact
signature the callers use, so `make lint` (mypy) rejects a family function with the wrong shape.
Nothing outside a family branches on which family it is. tests/test_family_contract.py runs every
registered family through this contract, and tests/test_toy_family.py adds a third one from a test.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:   # families/__init__ stays torch-free: the family modules bring torch when loaded
    import torch

Config = Any     # a transformers PretrainedConfig (decoders) or an open_clip model-config dict (CLIP)
Spec = Any       # compt_scale.config.ChainSpec (not imported: config.py imports the family registry)
Stage = Any      # compt_scale.config.StageSpec
Batch = tuple    # tensors, as the family's dataset returns them


class ModelIO(Protocol):
    """How a stage's weights are made, filled, taught and exported: partitioned through safetensors
    (families/hf_io.py) or whole in memory (families/in_memory_io.py). Collective where noted."""

    def build_student(self, cfg: Config, seed: int, ds_config: dict) -> torch.nn.Module: ...

    def ifd_heads(self, cfg: Config, teacher_cfg: Config, ifd: Any, ds_config: dict) -> list[torch.nn.Module]: ...

    def fill(self, student: torch.nn.Module, source: Path, source_cfg: Config, cfg: Config,
             growth: Any) -> dict:
        """Grow (or copy) the checkpoint at `source` into the live student; the growth report."""
        ...

    def load_teacher(self, export: Path, dtype: torch.dtype, ds_config: dict,
                     replicate: bool) -> tuple[torch.nn.Module, bool]:
        """(model, partitioned). `replicate`: whole on every rank even under a ZeRO-3 student."""
        ...

    def export(self, student: torch.nn.Module, engine: Any, dtype: torch.dtype, data_dir: Path, out: Path,
               shard_bytes: int) -> None:
        """Collective: every rank calls it; rank 0 writes `out` atomically. `engine`: the DeepSpeed
        engine training `student` (None: a model held whole, outside any engine)."""
        ...

    def export_as_is(self, init: Path, data_dir: Path, out: Path) -> None:
        """Rank 0: an `init:` model with no training, exported unchanged."""
        ...


@dataclass(frozen=True)
class Family:
    name: str
    budget_unit: str                                                  # what one sample of `tokens:` counts
    io: ModelIO
    # ---- models
    preset_names: Callable[[], list[str]]
    load_config: Callable[[str], Config]                              # preset name / config path / model dir
    plan_config: Callable[[Spec, Stage], Config]                      # before any data exists
    model_config: Callable[[Spec, Stage, Path], Config]               # (.., data_dir): what is built
    param_count: Callable[[Config], int]
    build: Callable[[Config, int], torch.nn.Module]                   # (config, seed): the student's own init
    config_of: Callable[[torch.nn.Module], Config]
    load_export: Callable[..., torch.nn.Module]                       # (path[, dtype])
    # ---- objective
    feature_dims: Callable[[Config], list[int]]                       # one width per IFD feature stream
    losses: Callable[[torch.nn.Module, Batch], tuple]                 # student: (task loss, [features])
    features: Callable[[torch.nn.Module, Batch], list]                # teacher: [features]
    probe: Callable[[torch.nn.Module, Batch], torch.Tensor]           # outputs tests compare exports with
    ifd_heads: Callable[[Config, Config, Any], list[torch.nn.Module]]  # (student, teacher, IFDSpec): T
    evaluate: Callable[[torch.nn.Module, Spec, Path, float], dict]    # (.., data_dir, val_loss): extra metrics
    # ---- data and cost
    prepare: Callable[[Spec, Path], Path]                             # (spec, data_dir) -> prepared dir
    dataset: Callable[[Spec, Path, str], Any]                         # (spec, data_dir, split): `.batch(idx)`
    tokens_per_sample: Callable[[Spec], int]
    stage_macs: Callable[[Config, Config | None, Spec, int], dict]    # one optimizer step
    flops_per_token: Callable[[Config, Spec], float]                  # model FLOPs per budget unit (MFU)
    memory_shape: Callable[[Config, Spec], tuple]                     # ([(tokens, hidden, heads, layers)], largest)
    # ---- memory and speedups
    enable_activation_checkpointing: Callable[[torch.nn.Module], None]   # non-reentrant, ZeRO-3 safe
    liger_supported: Callable[[Config], bool]                         # liger-kernel has patches for it
    apply_liger: Callable[[torch.nn.Module], None]
    validate_chain: Callable[[Spec], None]                            # config-level checks, one-line errors

    @classmethod
    def from_module(cls, module: Any, **values: Any) -> Family:
        """The family whose fields are the module's attributes of the same names (a family module
        ends with `FAMILY = Family.from_module(sys.modules[__name__], name=..., budget_unit=...)`)."""
        names = [f.name for f in fields(cls) if f.name not in values]
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            raise TypeError(f"family module {module.__name__} lacks {', '.join(missing)}")
        return cls(**values, **{n: getattr(module, n) for n in names})

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if str(f.type).startswith("Callable") and not callable(v):
                raise TypeError(f"family {self.name}: {f.name} is not callable")
        for m in ("build_student", "ifd_heads", "fill", "load_teacher", "export", "export_as_is"):
            if not callable(getattr(self.io, m, None)):
                raise TypeError(f"family {self.name}: io.{m} is not callable")
