"""Checkpoints: DeepSpeed's own, plus our loop state and RNG, and the student gathered for export.

DeepSpeed writes `global_stepN/` (save_latest=False); rank 0 then replaces `latest` atomically once
every rank has finished its shards, so a run killed mid-save still has the previous checkpoint as
latest. A `latest` that is empty, garbage or names a checkpoint that does not load falls back to the
previous kept checkpoint. We keep the newest `keep` checkpoints. (Exports are the family's
job, written through compt_scale.files.atomic_dir so `<stage>/model` is either complete or absent.)
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CompTError
from ..files import atomic_write_text
from .world_size_resume import drop_universal, optimizer_shards, write_geometry

KEEP_CHECKPOINTS = 2


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags on disk, oldest first."""
    return [p.name for p in sorted((p for p in Path(ckpt_dir).glob("global_step*")
                                    if p.is_dir() and p.name.removeprefix("global_step").isdigit()),
                                   key=lambda p: int(p.name.removeprefix("global_step")))]


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names if it is a checkpoint dir on disk, else None (missing, empty, garbage)."""
    try:
        tag = (Path(ckpt_dir) / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if tag in _tags(ckpt_dir) else None


def check_writable(ckpt_dir: Path) -> None:
    """Before training: a checkpoints dir that cannot be written (read-only, a file in its place) is
    one line now, not a traceback at the first save."""
    ckpt_dir = Path(ckpt_dir)
    # Probed where the next save writes: in the dir, or (before the first save makes it) beside it.
    where = ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent
    probe = where / f".write-test-{os.uname().nodename}-{os.getpid()}"
    try:
        if ckpt_dir.exists() and not ckpt_dir.is_dir():
            raise NotADirectoryError(20, "not a directory")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CompTError(f"cannot write checkpoints to {ckpt_dir}: {e.strerror or e}") from None


def save(engine, ckpt_dir: Path, step: int, loop_state: dict, geometry: dict, keep: int = KEEP_CHECKPOINTS) -> None:
    """`geometry`: world, train (TrainSpec), zero_stage; recorded so another world size can resume."""
    tag = f"global_step{step}"
    # `latest` is ours to write: DeepSpeed would rewrite it in place, before every rank has finished.
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"loop": loop_state, "rng": rng_state()},
                               save_latest=False)
    except PermissionError as e:   # made read-only during the run (a full disk is the stage's to handle)
        raise CompTError(f"cannot write checkpoint {Path(ckpt_dir) / tag}: {e.strerror}; earlier checkpoints "
                         f"kept") from None
    dist.barrier()
    if dist.get_rank() == 0:
        write_geometry(Path(ckpt_dir) / tag, **geometry)
        atomic_write_text(Path(ckpt_dir) / "latest", tag)
        for old in _tags(ckpt_dir)[:-keep]:
            shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
        drop_universal(ckpt_dir)
    dist.barrier()


def _load_tag(engine, ckpt_dir: Path, tag: str) -> dict:
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise CompTError(f"checkpoint {Path(ckpt_dir) / tag} is unreadable or truncated: "
                         f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if path is None or not client or "loop" not in client:
        raise CompTError(f"checkpoint {Path(ckpt_dir) / tag} is incomplete (no loop state)")
    return client


def _check_world_size(tag_dir: Path) -> None:
    """ZeRO partitions optimizer states per rank: a regular checkpoint of N ranks loads only on N ranks
    (the stage converts one of another world size to a universal checkpoint first)."""
    saved, world = optimizer_shards(tag_dir), dist.get_world_size()
    if saved and saved != world:
        raise CompTError(f"checkpoint {tag_dir} was written by {saved} ranks (ZeRO-partitioned) and cannot "
                         f"be loaded as it is on {world}")


def candidates(ckpt_dir: Path) -> list[str]:
    """Tags to resume from, best first: `latest`, then the kept checkpoints newest first, never one
    newer than `latest` (a newer dir is a save that did not finish on every rank)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "latest").exists():
        return []  # no save ever finished (a dir here is a first save cut short): start afresh
    latest = read_latest(ckpt_dir)
    order = ([latest] if latest else []) + [t for t in reversed(_tags(ckpt_dir)) if t != latest]
    if latest:
        order = [t for t in order if int(t.removeprefix("global_step")) <= int(latest.removeprefix("global_step"))]
    return order


def load(engine, ckpt_dir: Path, universal: str | None = None) -> dict | None:
    """Load the newest good checkpoint into the engine; returns the loop state, or None if there is none.

    `latest` first; if it is missing, empty or names a checkpoint that does not load, the kept
    checkpoints newest first, saying so on stderr (one line). `universal`: load that converted
    checkpoint instead (resuming on another world size; the engine was built with load_universal).
    """
    ckpt_dir = Path(ckpt_dir)
    if universal is not None:
        client = _load_tag(engine, ckpt_dir, universal)
        set_rng_state(client["rng"])
        return client["loop"]
    order = candidates(ckpt_dir)
    if not order:
        return None
    latest = read_latest(ckpt_dir)
    errors = []
    for tag in order:
        try:
            _check_world_size(ckpt_dir / tag)
            client = _load_tag(engine, ckpt_dir, tag)
        except CompTError as e:
            errors.append(str(e))
            continue
        if tag != latest and dist.get_rank() == 0:
            why = errors[-1] if errors else f"'latest' in {ckpt_dir} is missing or unreadable"
            print(f"[resume] {why}; resuming from {ckpt_dir / tag} instead", file=sys.stderr, flush=True)
        set_rng_state(client["rng"])
        return client["loop"]
    raise CompTError(errors[0] if len(errors) == 1 else
                     f"no loadable checkpoint in {ckpt_dir}: {errors[0]} (and {len(errors) - 1} older)")


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
