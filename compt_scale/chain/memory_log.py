"""Per-phase memory of a stage (peak RSS, and what each rank holds of a partitioned model):
stage_dir/memory/rank<r>.json, read by tests and benchmarks/memory.py."""
from __future__ import annotations

import json
from pathlib import Path

import torch


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


def peak_rss_bytes() -> int:
    """VmHWM: this process's resident-memory high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def record_memory(stage_dir: Path, rank: int, phase: str, model=None, engine=None) -> None:
    """stage_dir/memory/rank<r>.json: per phase, the peak RSS so far and (given a model) what this rank
    holds of it, (given an engine) the ZeRO-3 optimizer's buffers. Tests and benchmarks/memory.py read it."""
    path = Path(stage_dir) / "memory" / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec[phase] = {"peak_rss": peak_rss_bytes(), **(partition_census(model) if model is not None else {})}
    if engine is not None:
        rec[phase]["zero3_buffers"] = zero3_buffers(engine)
    path.write_text(json.dumps(rec, indent=1))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def zero3_buffers(engine) -> dict:
    """Bytes of the buffers a ZeRO-3 engine's optimizer holds on this rank, by name ({} under ZeRO
    0-2), read from the tensors themselves (a master copy counts only where it is its own tensor;
    DeepSpeed 0.19 keeps one in fp32 training too). `*_peak` entries live only inside a step: the fp32
    gradient of one sub-group (made from the training-dtype one, per sub-group, in `step`) and the
    buffer DeepSpeed's state init hangs on every sub-group's `.grad` until the first step replaces it."""
    opt = getattr(engine, "optimizer", None)
    if opt is None or not hasattr(opt, "fp32_partitioned_groups_flat"):
        return {}
    params = getattr(opt, "lp_param_buffer", None)
    shared = params.untyped_storage().data_ptr() if isinstance(params, torch.Tensor) else None
    fp32 = [t for t in opt.fp32_partitioned_groups_flat if torch.is_tensor(t)]
    master = [t for t in fp32 if t.untyped_storage().data_ptr() != shared]
    states = [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    buckets = [getattr(b, "buffer", None) for b in getattr(opt, "ipg_buckets", {}).values()]
    largest = max((t.numel() for t in fp32), default=0)
    return {"params_partition": _nbytes([params]),
            "master_fp32_partition": _nbytes(master),
            "adam_states_fp32": _nbytes(states),
            "grads_partition": _nbytes([getattr(opt, "grad_partitions_flat_buffer", None)]),
            "reduce_buckets": _nbytes(buckets),
            "sub_groups": len(fp32),
            "sub_group_fp32_grad_peak": 4 * largest,
            "state_init_grad_buffer_peak": 4 * largest}
