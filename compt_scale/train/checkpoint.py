"""Checkpoints: DeepSpeed's own, plus our loop state and RNG, and the student gathered for export.

DeepSpeed writes `global_stepN/` and only then rewrites `latest`, so a run killed mid-save still has
the previous checkpoint as latest. We keep the newest `keep` checkpoints. (Exports are the family's
job, written through compt_scale.files.atomic_dir so `<stage>/model` is either complete or absent.)
"""
from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CompTError


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise CompTError(f"checkpoint {ckpt_dir}: 'latest' names {tag}, which is missing")
    return tag


def save(engine, ckpt_dir: Path, step: int, loop_state: dict, keep: int = 2) -> None:
    tag = f"global_step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"loop": loop_state, "rng": rng_state()})
    dist.barrier()
    if dist.get_rank() == 0:
        tags = sorted((p for p in Path(ckpt_dir).glob("global_step*") if p.is_dir()),
                      key=lambda p: int(p.name.removeprefix("global_step")))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load(engine, ckpt_dir: Path) -> dict | None:
    """Load the latest checkpoint into the engine; returns the loop state, or None if there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise CompTError(f"checkpoint {Path(ckpt_dir) / tag} is unreadable or truncated: "
                         f"{str(e).splitlines()[0][:200]}") from None
    if path is None or not client or "loop" not in client:
        raise CompTError(f"checkpoint {Path(ckpt_dir) / tag} is incomplete (no loop state)")
    set_rng_state(client["rng"])
    return client["loop"]


def gather_student_state(engine) -> dict | None:
    """Full student weights on rank 0 (None elsewhere), without the IFD projection."""
    if engine.zero_optimization_stage() == 3:
        # DeepSpeed gathers ZeRO-3 partitions module by module onto rank 0.
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        full = engine.module.state_dict() if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    return {k.removeprefix("student."): v.detach().to("cpu", torch.float32).clone()
            for k, v in full.items() if k.startswith("student.")}
