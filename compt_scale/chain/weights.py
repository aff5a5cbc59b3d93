"""Where a stage's weights come from and go to, with no rank holding a whole model it does not need
(families with `partitioned_io`; open_clip keeps its small in-memory path in stage.py).

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
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..files import atomic_dir
from ..grow.stream import TOKENIZER_FILES, write_safetensors

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


def is_zero3(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage", 0) == 3


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
    # The optimizer's state init allocates one full-size (not partitioned) fp32 buffer per sub-group;
    # DeepSpeed's default sub-group is the whole model.
    z["sub_group_size"] = min(int(z.get("sub_group_size", 10**9)), max(24 * h2, 10**7))
    return ds_config


def partition_census(model: torch.nn.Module) -> dict:
    """How much of the model this rank holds: parameters held whole vs. their full sizes."""
    whole = local = total = 0
    for p in model.parameters():
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        held = p.ds_tensor.numel() + p.data.numel() if hasattr(p, "ds_tensor") else p.numel()
        whole += int(held >= full > 1)
        local += held
        total += full
    return {"params_held_whole": whole, "local_numel": local, "total_numel": total}


def build_student(family, cfg, seed: int, ds_config: dict):
    if is_zero3(ds_config):
        with hf_zero3(ds_config):
            return family.build(cfg, seed)
    return family.build(cfg, seed)


def build_ifd_heads(family, cfg, t_cfg, ifd, ds_config: dict) -> list:
    """The IFD projections T, made the way the student was: under ZeRO-3 inside deepspeed.zero.Init
    (partitioned, in the engine's dtype). DeepSpeed casts a module to bf16 only when none of its
    parameters is partitioned yet, so T built whole beside a partitioned student would stay fp32 and
    ZeRO-3's flat bf16 buffer would refuse it."""
    if not is_zero3(ds_config):
        return family.ifd_heads(cfg, t_cfg, ifd)
    import deepspeed
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return family.ifd_heads(cfg, t_cfg, ifd)


def fill_from(model, source_dir: Path, src_cfg, cfg, width: str, depth: str) -> dict:
    """Grow (or, for an equal config, copy) the HF checkpoint at source_dir into the live model.

    Rank 0 reads the source one tensor at a time; ZeRO-3 re-partitions each parameter as it is
    written, and an unpartitioned model is broadcast from rank 0 by deepspeed.initialize."""
    from ..grow import SafetensorsReader, grow_into_model
    reader = SafetensorsReader(source_dir) if dist.get_rank() == 0 else {}
    return grow_into_model(model, reader, src_cfg, cfg, width=width, depth=depth)


def teacher_ds_config(student_ds: dict) -> dict:
    """ZeRO-3 inference: no optimizer, the student's dtype and micro-batch."""
    cfg = {"train_micro_batch_size_per_gpu": student_ds.get("train_micro_batch_size_per_gpu", 1),
           "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    for k in ("bf16", "fp16"):
        if k in student_ds:
            cfg[k] = student_ds[k]
    return cfg


def load_teacher(family, export: Path, dtype: torch.dtype, ds_config: dict):
    """(model, partitioned): a ZeRO-3 inference module under a ZeRO-3 student unless it fits whole
    (train/teacher_placement.py), else the whole model."""
    from ..train.teacher_placement import replicate_teacher
    if not is_zero3(ds_config) or replicate_teacher(family.param_count(family.load_config(str(export))), dtype):
        return family.load_export(export), False
    import deepspeed
    t_ds = teacher_ds_config(ds_config)
    with hf_zero3(t_ds):
        model = family.load_export(export, dtype=dtype)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=t_ds)
    return engine.module.eval(), True


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
    rank = dist.get_rank()
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
        for f in TOKENIZER_FILES:
            (tmp / f).unlink(missing_ok=True)
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))


def peak_rss_bytes() -> int:
    """VmHWM: this process's resident-memory high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def record_memory(stage_dir: Path, rank: int, phase: str, model=None) -> None:
    """stage_dir/memory/rank<r>.json: per phase, the peak RSS so far and (given a model) what this rank
    holds of it. Tests and benchmarks/memory.py read it."""
    path = Path(stage_dir) / "memory" / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec[phase] = {"peak_rss": peak_rss_bytes(), **(partition_census(model) if model is not None else {})}
    path.write_text(json.dumps(rec, indent=1))
