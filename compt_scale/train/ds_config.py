"""DeepSpeed config for one stage: a preset from `ds_configs/` picked by memory need, "auto" values
filled from the chain spec's TrainSpec.

Rule used when `train.zero_stage` is "auto": bytes per GPU, not parameter count (train/memory.py).
The presets are tried in order zero1-small (ZeRO-1: optimizer states sharded), zero2-medium (+ gradients
sharded), zero3-large (+ parameters sharded), zero3-offload-xl (+ optimizer and parameters offloaded
to CPU); the first whose estimated need (model states by DeepSpeed's estimators + teacher +
activations) fits 90% of `train.gpu_mem` (default: the device's memory, 80 GiB without one) is taken.
So a 70B student on 32 A100-80GB gets ZeRO-3 without offload; tiny CPU test models get ZeRO-1, which
still exercises the sharded-optimizer checkpoint layout the bigger presets use.
A numeric `zero_stage` forces that stage (0 and 1 use zero1-small with the stage set, 2 zero2-medium,
3 zero3-large; offload is only chosen by memory or by an explicit `ds_config`). An explicit
`train.ds_config` file replaces the preset; a numeric `zero_stage` still overrides its stage.

The TrainSpec is the single source of truth for what it holds (batch sizes, lr, weight decay, clip,
precision): the trainer's data loader and LR schedule use those values, so a ds_config that states a
different number is an error naming the key rather than a silent mismatch. Keys the TrainSpec does
not hold (betas, eps, bucket sizes) keep explicit values; "auto" gives our defaults.

There is never a "scheduler": the trainer drives the learning rate itself with a torch LambdaLR that it
passes to `deepspeed.initialize` (one schedule for every ZeRO stage, saved in our checkpoints). A
scheduler in a user ds_config is dropped.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from ..errors import CompTError, read_json
from ..resources import DS_CONFIGS, resource

# Shipped with the package (the repository's ds_configs/ links here); COMPT_DS_CONFIGS points elsewhere.
PRESET_DIR = Path(os.environ.get("COMPT_DS_CONFIGS") or resource(DS_CONFIGS))

STAGE_PRESET = {0: "zero1-small", 1: "zero1-small", 2: "zero2-medium", 3: "zero3-large"}

BETAS = [0.9, 0.95]
EPS = 1e-8
STEPS_PER_PRINT = 1_000_000_000  # our trainer logs; DeepSpeed's own step prints are noise

# ZeRO keys that HF-style configs leave "auto" (derived there from hidden size). We do not know the
# hidden size here, so an "auto" for these is removed and DeepSpeed's own default applies.
_ZERO_AUTO_DROPPABLE = {
    "reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "sub_group_size",
}


def pick_preset(n_params: int, zero_stage: int | str = "auto", candidates=None, gpu_mem: int | None = None) -> str:
    """Name of the ds_configs preset (without .json) for a student of n_params parameters: a forced
    `zero_stage`, else the first preset whose per-GPU memory need fits (train/memory.py). Without
    `candidates` (the caller knows nothing of the model's shape or the world) the need is one GPU's
    model states alone."""
    from . import memory
    if zero_stage != "auto":
        if zero_stage not in STAGE_PRESET:
            raise CompTError(f"train.zero_stage: must be 0, 1, 2, 3 or 'auto', got {zero_stage!r}")
        return STAGE_PRESET[zero_stage]
    if candidates is None:
        candidates = memory.needs(n_params, 0, world=1, gpus_per_node=1, activation_bytes=0)
    return memory.choose(candidates, gpu_mem or memory.DEFAULT_GPU_MEM).preset


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise CompTError(f"DeepSpeed preset not found: {path}")
    return json.loads(path.read_text())


def _load_json(path: str) -> dict:
    try:
        return read_json(path, "file")
    except CompTError as e:
        raise CompTError(f"train.ds_config: {e}") from None


def _set(section: dict, key: str, value: Any, where: str) -> None:
    """Fill `key` from the TrainSpec: an "auto" or missing value takes it; an explicit one must agree."""
    cur = section.get(key, "auto")
    if cur == "auto" or cur is None:
        section[key] = value
    elif isinstance(value, bool) or isinstance(cur, bool):
        if bool(cur) != bool(value):
            raise CompTError(f"ds_config {where}{key}: {cur!r} contradicts the chain spec ({value!r})")
    elif float(cur) != float(value):
        raise CompTError(f"ds_config {where}{key}: {cur!r} contradicts the chain spec ({value!r}); "
                         f"set it in the spec's train: section or use \"auto\"")


def _find_auto(obj: Any, path: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if obj == "auto" else []


def build_ds_config(n_params: int, train, world_size: int, cuda: bool | None = None, candidates=None) -> dict:
    """The DeepSpeed config dict for a stage whose student has n_params parameters.

    `train` is a compt_scale.config.TrainSpec. `cuda` says whether ranks run on GPUs (default: ask
    torch); without CUDA the optimizer is torch's AdamW (`torch_adam`), because DeepSpeed's FusedAdam
    and DeepSpeedCPUAdam are C++/CUDA extensions that would have to be JIT-compiled on CPU boxes.
    """
    if world_size < 1:
        raise CompTError(f"world_size must be >= 1, got {world_size}")
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    cfg = copy.deepcopy(_load_json(train.ds_config) if train.ds_config
                        else load_preset(pick_preset(n_params, train.zero_stage, candidates, _gpu_mem(train))))

    _set_geometry(cfg, train, world_size)
    _set_precision(cfg, train, world_size)
    _set_optimizer(cfg, train, cuda)
    cfg.pop("scheduler", None)  # the trainer's LambdaLR drives lr (see module docstring)
    cfg.setdefault("steps_per_print", STEPS_PER_PRINT)
    if cfg["steps_per_print"] == "auto":
        cfg["steps_per_print"] = STEPS_PER_PRINT

    _set_zero(cfg, train, cuda)
    left = _find_auto(cfg)
    if left:
        raise CompTError(f"ds_config: no value for \"auto\" at {', '.join(left)} (not derived from the spec)")
    return cfg


def _set_geometry(cfg: dict, train, world_size: int) -> None:
    """Batch geometry: train_batch_size = micro * accum * world, as DeepSpeed checks."""
    mb, ga = train.micro_batch_size, train.grad_accum
    _set(cfg, "train_micro_batch_size_per_gpu", mb, "")
    _set(cfg, "gradient_accumulation_steps", ga, "")
    _set(cfg, "train_batch_size", mb * ga * world_size, "")
    _set(cfg, "gradient_clipping", train.grad_clip, "")



def _set_precision(cfg: dict, train, world_size: int) -> None:
    # Precision: bf16 from the spec; fp16 is not something the spec can ask for, so it must be off.
    bf16 = cfg.setdefault("bf16", {})
    _set(bf16, "enabled", train.precision == "bf16", "bf16.")
    if cfg.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise CompTError("ds_config fp16.enabled: fp16 is not supported; use train.precision: bf16")
    cfg.pop("fp16", None)
    # No per-step overflow read-back: the trainer's on-device finiteness check stands in (ds_patches.py).
    if bf16["enabled"]:
        bf16.setdefault("check_grad_overflow", False)
    # Gradients are reduced across ranks in fp32 when training in bf16: a sum of many bf16 gradients
    # loses most of its mantissa (8 bits). Costs 2x the reduction bandwidth; a user config may say bf16.
    # On one rank there is no reduction: fp32 would only add a cast of every gradient per step.
    if cfg.get("communication_data_type", "auto") == "auto":
        cfg.pop("communication_data_type", None)
        if train.precision == "bf16" and world_size > 1:
            cfg["communication_data_type"] = "fp32"
    # DeepSpeed's throughput timer synchronizes the device at every step by default (and reports
    # what the trainer's own tokens/s already logs): off unless a user config asks for it.
    cfg.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})



def _set_optimizer(cfg: dict, train, cuda: bool) -> None:
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise CompTError(f"ds_config optimizer.type: {opt.get('type')!r}; only AdamW is supported")
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    _set(params, "lr", train.lr, "optimizer.params.")
    _set(params, "weight_decay", train.weight_decay, "optimizer.params.")
    if params.get("betas", "auto") == "auto":
        params["betas"] = list(BETAS)
    if params.get("eps", "auto") == "auto":
        params["eps"] = EPS
    if not cuda:
        params["torch_adam"] = True
        # torch's fused CPU kernel: one pass, no per-step temporaries; the default (for-loop) AdamW
        # makes two fp32 temporaries the size of each ZeRO sub-group (sqrt(v), then / bias correction).
        params.setdefault("fused", True)



def _set_zero(cfg: dict, train, cuda: bool) -> None:
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if train.zero_stage != "auto":
        zero["stage"] = int(train.zero_stage)
        if zero["stage"] < 3:  # offload_param is a ZeRO-3 feature; DeepSpeed rejects it below
            zero.pop("offload_param", None)
    for k in [k for k, v in zero.items() if v == "auto" and k in _ZERO_AUTO_DROPPABLE]:
        del zero[k]
    if not cuda:  # pinned host memory needs a CUDA driver
        for k in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(k), dict):
                zero[k]["pin_memory"] = False


def _gpu_mem(train) -> int:
    from .memory import gpu_memory
    return gpu_memory(train.gpu_mem)


def describe(n_params: int, train, candidates=None) -> str:
    """One line for logs: which preset/stage a stage uses and why."""
    if train.ds_config:
        return f"ds_config {train.ds_config}" + (f" (zero_stage {train.zero_stage} forced)"
                                                 if train.zero_stage != "auto" else "")
    name = pick_preset(n_params, train.zero_stage, candidates, _gpu_mem(train))
    if train.zero_stage != "auto":
        return f"ds preset {name} (forced by train.zero_stage)"
    need = next((c for c in candidates or [] if c.preset == name), None)
    return f"ds preset {name} ({need.total / 2**30:.1f} GiB per GPU estimated)" if need else f"ds preset {name}"


def is_zero3(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage", 0) == 3
