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


def record_memory(stage_dir: Path, rank: int, phase: str, model=None) -> None:
    """stage_dir/memory/rank<r>.json: per phase, the peak RSS so far and (given a model) what this rank
    holds of it. Tests and benchmarks/memory.py read it."""
    path = Path(stage_dir) / "memory" / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec[phase] = {"peak_rss": peak_rss_bytes(), **(partition_census(model) if model is not None else {})}
    path.write_text(json.dumps(rec, indent=1))
