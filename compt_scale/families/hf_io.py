"""The HF decoders' model I/O (families/base.py ModelIO): where a stage's weights come from and go
to, with no rank holding a whole model it does not need.

student: under ZeRO-3 built inside deepspeed.zero.Init (an HfDeepSpeedConfig alive, so transformers'
  own init runs partitioned), else built whole; then filled in place one parameter at a time from the
  predecessor's export or the stage's `init:` dir, read lazily from safetensors (grow_into_model): no
  state dict, no second copy.
teacher: under a ZeRO-3 student a ZeRO-3 inference engine (no optimizer; parameters gathered module by
  module in its forward), loaded shard by shard; otherwise replicated (it is smaller than the student,
  which then fits whole on every rank too).
export: parameter by parameter (gather one, write it, free it) into HF sharded safetensors + index.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..files import atomic_dir
from ..grow.stream import TOKENIZER_FILES, write_safetensors
from ..train.ds_config import is_zero3

EXPORT_SHARD_BYTES = 5 * 2**30   # HF's default max_shard_size


@contextlib.contextmanager
def hf_zero3(ds_config: dict):
    """transformers' from_config/from_pretrained build inside deepspeed.zero.Init while this is open."""
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        unset_hf_deepspeed_config,
    )
    keep = HfDeepSpeedConfig(ds_config)   # transformers holds only a weak reference
    try:
        yield keep
    finally:
        unset_hf_deepspeed_config()


def teacher_ds_config(student_ds: dict) -> dict:
    """ZeRO-3 inference: no optimizer, the student's dtype and micro-batch."""
    cfg = {"train_micro_batch_size_per_gpu": student_ds.get("train_micro_batch_size_per_gpu", 1),
           "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    for k in ("bf16", "fp16"):
        if k in student_ds:
            cfg[k] = student_ds[k]
    return cfg




def _gathered_read(p):
    if hasattr(p, "ds_id"):
        import deepspeed
        return deepspeed.zero.GatheredParameters([p], modifier_rank=None)   # read only: no re-partition
    return contextlib.nullcontext()


def export_model(model, dtype: torch.dtype, tokenizer_dir: Path, out: Path,
                 max_shard_bytes: int = EXPORT_SHARD_BYTES) -> None:
    """Collective: every rank calls it. Rank 0 writes `out` (atomic) as save_pretrained would, holding
    one gathered parameter at a time; tied parameters are written once, under their first name."""
    from transformers import AutoTokenizer
    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors, items, seen = {}, [], set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            continue
        seen.add(id(v))
        shape = tuple(v.ds_shape) if hasattr(v, "ds_shape") else tuple(v.shape)
        tensors[k] = v
        items.append((k, dtype if v.is_floating_point() else v.dtype, shape))

    def produce(key):
        v = tensors[key]
        with _gathered_read(v), torch.no_grad():
            return v.data.detach().to("cpu", items_dtype[key]).clone() if rank == 0 else None

    items_dtype = {k: d for k, d, _ in items}
    if rank != 0:
        write_safetensors(out, items, produce, max_shard_bytes, write=False)
        return
    with atomic_dir(out) as tmp:
        write_safetensors(tmp, items, produce, max_shard_bytes)
        config = type(model.config).from_dict(model.config.to_dict())
        config.architectures = [type(model).__name__]
        config.dtype = str(dtype).removeprefix("torch.")
        config.to_json_file(str(tmp / "config.json"))
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))


def export_as_is(init: Path, tokenizer_dir: Path, out: Path) -> None:
    """An `init:` model with no training: its own files, byte for byte, plus the chain's tokenizer."""
    from transformers import AutoTokenizer
    init = Path(init)
    with atomic_dir(out) as tmp:
        for f in init.iterdir():
            if f.is_file() and (f.suffix == ".safetensors" or f.name in ("model.safetensors.index.json",
                                                                        "config.json", "generation_config.json")):
                shutil.copy2(f, tmp / f.name)
        for name in TOKENIZER_FILES:
            (tmp / name).unlink(missing_ok=True)
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))


class PartitionedHFIO:
    """ModelIO of the HF decoders: built partitioned under ZeRO-3, filled and exported one parameter
    at a time through safetensors. `build`, `heads` and `load` are the family's own functions."""

    def __init__(self, build: Callable, heads: Callable, load: Callable):
        self._build, self._heads, self._load = build, heads, load

    def build_student(self, cfg, seed: int, ds_config: dict) -> torch.nn.Module:
        if is_zero3(ds_config):
            with hf_zero3(ds_config):
                return self._build(cfg, seed)
        return self._build(cfg, seed)

    def ifd_heads(self, cfg, teacher_cfg, ifd, ds_config: dict) -> list[torch.nn.Module]:
        """Made the way the student was: under ZeRO-3 inside deepspeed.zero.Init (partitioned, in the
        engine's dtype). DeepSpeed casts a module to bf16 only when none of its parameters is
        partitioned yet, so heads built whole beside a partitioned student would stay fp32 and
        ZeRO-3's flat bf16 buffer would refuse them (the bf16 + ZeRO-3 grown-stage crash)."""
        if not is_zero3(ds_config):
            return self._heads(cfg, teacher_cfg, ifd)
        import deepspeed
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return self._heads(cfg, teacher_cfg, ifd)

    def fill(self, student, source: Path, source_cfg, cfg, growth) -> dict:
        """Grow (or, for an equal config, copy) the HF checkpoint at `source` into the live student.
        Rank 0 reads the source one tensor at a time; ZeRO-3 re-partitions each parameter as it is
        written, and an unpartitioned model is broadcast from rank 0 by deepspeed.initialize."""
        from ..grow import SafetensorsReader, grow_into_model
        reader = SafetensorsReader(source) if dist.get_rank() == 0 else {}
        return grow_into_model(student, reader, source_cfg, cfg, width=growth.width, depth=growth.depth)

    def load_teacher(self, export: Path, dtype: torch.dtype, ds_config: dict,
                     replicate: bool) -> tuple[torch.nn.Module, bool]:
        """(model, partitioned): a ZeRO-3 inference module under a ZeRO-3 student unless the plan
        replicates it (it fits whole: train/teacher_placement.py), else the whole model."""
        if not is_zero3(ds_config) or replicate:
            return self._load(export), False
        import deepspeed
        t_ds = teacher_ds_config(ds_config)
        with hf_zero3(t_ds):
            model = self._load(export, dtype=dtype)
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=t_ds)
        return engine.module.eval(), True

    def export(self, student, engine, dtype: torch.dtype, data_dir: Path, out: Path, shard_bytes: int) -> None:
        export_model(student, dtype, data_dir / "tokenizer", out, shard_bytes)   # gathers what is partitioned

    def export_as_is(self, init: Path, data_dir: Path, out: Path) -> None:
        export_as_is(init, data_dir / "tokenizer", out)
