"""The stage plan: every decision a stage needs, made once, into a frozen value.

`plan_stage(spec, name, world)` resolves what a stage is: the student's final config (after the
growth's own config changes, e.g. a width `clone` untying tied embeddings), where its weights come
from (the predecessor's export or an `init:` dir) and that source's config, the teacher (the
predecessor when IFD is on), the TrainSpec after a world-size re-split, steps, samples and MACs per
step, the memory need of every DeepSpeed preset, the DeepSpeed config and the seed.

`compt-scale plan`, `plan --gpus`, `slurm`, the stage runner and the report all read plans from here,
so what `plan` prints is what the run does by construction; the spec is never mutated.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import ChainSpec, GrowthSpec, IFDSpec, StageSpec, TrainSpec
from ..errors import CompTError
from ..families import get_family
from ..families.base import Family
from ..train import memory

Config = Any   # the family's model config (families/base.py)


@dataclass(frozen=True)
class WeightSource:
    """Where a stage's initial weights come from: a finished predecessor's export or an `init:` dir.
    `config` is that checkpoint's own config (the predecessor's planned final config before it exists)."""
    kind: Literal["predecessor", "init"]
    stage: str | None        # the predecessor's name (None for init:)
    path: Path | None        # None while planning without --out
    config: Config


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: Literal["chain", "baseline"]
    world: int
    seed: int
    student: Config                  # the config the student is built with (growth changes applied)
    params: int                      # the built student's parameter count (tied weights once)
    source: WeightSource | None
    teacher: Config | None           # the IFD teacher's config: the predecessor, with IFD on
    teacher_params: int
    growth: GrowthSpec
    config_changes: dict             # what the growth changed in the student's config
    ifd: IFDSpec
    train: TrainSpec                 # after a world-size re-split of a resumed checkpoint
    tokens: int
    steps: int
    samples_per_step: int
    macs_per_step: dict              # macs, train_macs, teacher_macs of one optimizer step
    spec: ChainSpec
    gpus_per_node: int | None

    @cached_property
    def memory(self) -> tuple[memory.Need, ...]:
        """Per-GPU need of each preset, in the order `zero_stage: auto` tries them (computed on first
        use: DeepSpeed's estimators are a heavy import that `plan` without --gpus does not need)."""
        return tuple(memory_needs(get_family(self.spec.family), self.spec, self.train, self.student,
                                  self.teacher_params, self.params, self.world, self.gpus_per_node))

    @cached_property
    def ds_config(self) -> dict:
        """The DeepSpeed config: the preset `zero_stage` names or `auto` picks from `memory`."""
        from ..train.ds_config import build_ds_config
        ds_config = build_ds_config(self.params, self.train, self.world, candidates=list(self.memory))
        if self.train.ds_config is None:
            ds_config = fit_zero3_buckets(ds_config, max(get_family(self.spec.family).feature_dims(self.student)))
        return ds_config

    @property
    def grown(self) -> bool:
        """Whether the student starts from its source's weights (`growth.init: random` keeps the
        student's own init and uses the predecessor only as the teacher; an init: dir is always read)."""
        return self.source is not None and (self.growth.init == "grow" or self.source.kind == "init")

    @property
    def init(self) -> str:
        """How the student starts: `plan` prints it, the manifest records it, the stage does it."""
        from ..train.init_rule import describe
        src = self.source
        return describe(self.train, self.grown, None if src is None else (src.stage or f"init: {src.path}"))

    @cached_property
    def replicate_teacher(self) -> bool:
        """Under a ZeRO-3 student, a teacher whose weights fit is replicated rather than partitioned
        (train/teacher_placement.py): a partitioned one all-gathers every layer in every forward."""
        from ..train.teacher_placement import replicate_teacher
        dtype = torch.bfloat16 if self.train.precision == "bf16" else torch.float32
        return self.teacher is not None and replicate_teacher(self.teacher_params, dtype)

    def cost(self) -> dict:
        """MACs of the whole stage (train_macs, teacher_macs, macs)."""
        return {k: self.macs_per_step[k] * self.steps for k in ("train_macs", "teacher_macs", "macs")}

    def fresh_ds_config(self) -> dict:
        """A copy the engine may modify (DeepSpeed fills values in; a universal resume adds keys)."""
        return copy.deepcopy(self.ds_config)


def samples_per_step(spec: ChainSpec, train: TrainSpec, world: int) -> int:
    return train.micro_batch_size * train.grad_accum * world


def steps_for_tokens(tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps that cover `tokens` (at least one); 0 for an `init:` model used as-is."""
    return 0 if tokens == 0 else max(1, math.ceil(tokens / tokens_per_step))


def with_changes(config: Config, changes: dict) -> Config:
    """A copy of `config` with the growth's config changes (dict configs and HF config objects)."""
    if not changes:
        return config
    out = copy.deepcopy(config)
    for k, v in changes.items():
        if isinstance(out, dict):
            out[k] = v
        else:
            setattr(out, k, v)
    return out


def _source(spec: ChainSpec, stage: StageSpec, out: Path | None, world: int, loaded: bool) -> WeightSource | None:
    """The stage's weight source. `loaded`: read the config from the checkpoint itself (the run;
    the export exists by then) rather than planning it (before anything ran)."""
    family = get_family(spec.family)
    pred = spec.predecessor(stage.name)
    if pred is not None:
        path = out / pred.name / "model" if out is not None else None
        if loaded and path is not None:
            return WeightSource("predecessor", pred.name, path, _load_config(family, stage.name, path,
                                                                           "predecessor export"))
        return WeightSource("predecessor", pred.name, path, planned_config(spec, pred))
    if stage.init:
        init = Path(stage.init)
        return WeightSource("init", None, init, _load_config(family, stage.name, init, "init: model"))
    return None


def planned_config(spec: ChainSpec, stage: StageSpec) -> Config:
    """A chain stage's final config before anything ran: its preset with the config changes its own
    growth makes (from its predecessor's planned config, or its init: dir)."""
    family = get_family(spec.family)
    cfg = family.plan_config(spec, stage)
    pred = spec.predecessor(stage.name)
    if pred is not None and spec.growth_for(stage).init == "random":
        return cfg   # the predecessor only teaches: the student keeps its own config and init
    if pred is not None:
        source_cfg = planned_config(spec, pred)
    elif stage.init:
        source_cfg = _load_config(family, stage.name, Path(stage.init), "init: model")
    else:
        return cfg
    return with_changes(cfg, growth_changes(spec, stage, source_cfg, cfg))


def growth_changes(spec: ChainSpec, stage: StageSpec, source_cfg: Config, cfg: Config) -> dict:
    """What growing `source_cfg` into `cfg` changes in the config (e.g. a widening clone unties)."""
    from ..grow.registry import plan as growth_plan
    growth = spec.growth_for(stage)
    return dict(growth_plan(source_cfg, cfg, [], growth.width, growth.depth)[1]["config_changes"])


def _load_config(family: Family, name: str, path: Path, what: str) -> Config:
    try:
        return family.load_config(str(path))
    except (CompTError, OSError, ValueError, KeyError) as e:
        raise CompTError(f"stage {name}: cannot load {what} {path}: {str(e).splitlines()[0]}") from None


def plan_stage(spec: ChainSpec, name: str, world: int | None = None, *, out: Path | None = None,
               data_dir: Path | None = None, train: TrainSpec | None = None,
               gpus_per_node: int | None = None, tokens: int | None = None) -> StagePlan:
    """The plan of stage `name` on `world` ranks (default: the spec's nproc).

    Planning (`plan`, `slurm`): configs from presets and the predecessors' plans. Running (`stage`):
    `data_dir` (the prepared data: the tokenizer's vocabulary and special tokens) and `out` (the
    predecessor's export is read for its config); `train` is the TrainSpec after a world-size
    re-split of a checkpoint being resumed. `tokens` overrides the stage's budget (budget filling
    prices a stage before its budget is known)."""
    family = get_family(spec.family)
    stage = spec.stage(name)
    world = spec.nproc if world is None else world
    train = train or spec.train_for(stage)
    growth, ifd = spec.growth_for(stage), spec.ifd_for(stage)
    cfg = family.model_config(spec, stage, data_dir) if data_dir else family.plan_config(spec, stage)
    source = _source(spec, stage, out, world, loaded=data_dir is not None) if spec.is_chain_stage(name) else None
    grows = source is not None and (growth.init == "grow" or source.kind == "init")
    changes = growth_changes(spec, stage, source.config, cfg) if grows and source is not None else {}
    cfg = with_changes(cfg, changes)
    teacher = source.config if source is not None and source.kind == "predecessor" and ifd.enabled else None
    params = family.param_count(cfg)
    tokens = stage.tokens if tokens is None else tokens
    if tokens is None:
        raise CompTError(f"stage {name}: missing budget (give tokens, or a top-level budget:)")
    samples = samples_per_step(spec, train, world)
    steps = steps_for_tokens(tokens, samples * family.tokens_per_sample(spec))
    t_params = family.param_count(teacher) if teacher is not None else 0
    return StagePlan(
        name=name, kind="chain" if spec.is_chain_stage(name) else "baseline", world=world,
        seed=spec.seed + 1000 * (spec.index(name) + 1), student=cfg, params=params, source=source,
        teacher=teacher, teacher_params=t_params, growth=growth, config_changes=changes, ifd=ifd, train=train, tokens=tokens,
        steps=steps, samples_per_step=samples, macs_per_step=family.stage_macs(cfg, teacher, spec, samples),
        spec=spec, gpus_per_node=gpus_per_node)


def memory_needs(family: Family, spec: ChainSpec, train: TrainSpec, cfg: Config, teacher_params: int,
                 n_params: int, world: int, gpus_per_node: int | None = None) -> list[memory.Need]:
    """Per-GPU need of each preset (train/memory.py), from which `zero_stage: auto` picks. A teacher
    counts only when one is loaded (IFD on)."""
    import os
    towers, largest = family.memory_shape(cfg, spec)
    acts = memory.activations(towers, train.micro_batch_size, train.activation_checkpointing)
    per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return memory.needs(n_params, largest, world, per_node, acts, teacher_params)


def fit_zero3_buckets(ds_config: dict, hidden: int) -> dict:
    """ZeRO-3 bucket sizes scaled to the model, as transformers' Trainer fills "auto" (reduce h^2,
    prefetch 0.9 h^2, persistence 10 h), never above the preset's; gathered parameters kept live or
    for reuse capped at ~2 decoder layers (24 h^2). The presets' fixed 5e8/1e9-element sizes are
    ~2 GB fp32 buffers and keep a 200M student gathered whole between forward and backward."""
    z = ds_config.get("zero_optimization", {})
    if z.get("stage") != 3:
        return ds_config
    h2 = hidden * hidden
    for key, size in (("reduce_bucket_size", h2), ("stage3_prefetch_bucket_size", int(0.9 * h2)),
                      ("stage3_param_persistence_threshold", 10 * hidden),
                      ("stage3_max_live_parameters", 24 * h2), ("stage3_max_reuse_distance", 24 * h2)):
        if key in z:
            z[key] = min(int(z[key]), size)
    # The optimizer's state init allocates one fp32 buffer the size of the largest sub-group (this
    # rank's partition of it), kept until the first step; each step makes one sub-group's fp32
    # gradient at a time. DeepSpeed's default sub-group is the whole model.
    z["sub_group_size"] = min(int(z.get("sub_group_size", 10**9)), max(24 * h2, 10**7))
    return ds_config
