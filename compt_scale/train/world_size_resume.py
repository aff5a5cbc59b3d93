"""Resuming a stage on another number of ranks (a node lost: 16 -> 8 GPUs; or more nodes granted).

Two things must carry over:
- The sample stream and the LR schedule. A step is a fixed slice of the global sample stream
  (`data.packed.sample_indices`: step s reads global samples s*G .. (s+1)*G-1 for a global batch G), so
  we keep G and re-split it: grad_accum = G / (micro_batch * world). The number of steps, the schedule
  and the samples each step sees are then those of the run that wrote the checkpoint.
- The ZeRO-partitioned optimizer state. A checkpoint of N ranks holds N optimizer shards; DeepSpeed's
  universal checkpoint (`ds_to_universal`: one fp32 file per parameter and optimizer state) is the
  format any world size and ZeRO stage can load (`"checkpoint": {"load_universal": true}`). Rank 0
  converts once, into `<tag>_universal` (built in a temp dir and renamed, so it is whole or absent);
  the next regular save removes it.

Every save records its geometry in `<tag>/run.json`; a checkpoint without one (written before this
file existed) is taken to have the spec's geometry at the world its optimizer shards show.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import CompTError
from ..files import atomic_write_text

RUN_FILE = "run.json"
UNIVERSAL_SUFFIX = "_universal"


@dataclasses.dataclass(frozen=True)
class SavedGeometry:
    world: int
    micro_batch: int
    grad_accum: int
    zero_stage: int | None   # None: a checkpoint from before run.json (stage unknown)

    @property
    def global_batch(self) -> int:
        return self.world * self.micro_batch * self.grad_accum


def write_geometry(tag_dir: Path, world: int, train, zero_stage: int) -> None:
    atomic_write_text(Path(tag_dir) / RUN_FILE, json.dumps(
        {"world": world, "micro_batch": train.micro_batch_size, "grad_accum": train.grad_accum,
         "zero_stage": zero_stage}))


def optimizer_shards(tag_dir: Path) -> int:
    return len(list(Path(tag_dir).glob("*zero_pp_rank_*_optim_states.pt")))


def read_geometry(tag_dir: Path, train) -> SavedGeometry | None:
    tag_dir = Path(tag_dir)
    try:
        rec = json.loads((tag_dir / RUN_FILE).read_text())
        return SavedGeometry(int(rec["world"]), int(rec["micro_batch"]), int(rec["grad_accum"]),
                             int(rec["zero_stage"]))
    except FileNotFoundError:
        shards = optimizer_shards(tag_dir)
        return SavedGeometry(shards, train.micro_batch_size, train.grad_accum, None) if shards else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: the checkpoint's own load will name the problem


def resplit(saved: SavedGeometry | None, world: int, train, tag_dir: Path):
    """The TrainSpec for continuing a checkpoint of `saved` geometry on `world` ranks: the same global
    batch re-split as grad_accum (or one line saying why this world cannot continue it)."""
    if saved is None or saved.world == world:
        return train
    per_micro = train.micro_batch_size * world
    if saved.global_batch % per_micro:
        g, mb = saved.global_batch, train.micro_batch_size
        fix = (f"resume on a number of ranks that divides {g // mb}" if g % mb == 0 else
               f"set train.micro_batch_size to a divisor of {g}")
        raise CompTError(f"checkpoint {tag_dir}: its global batch of {g} samples ({saved.world} ranks) does not "
                         f"split into micro-batches of {mb} over {world} ranks; {fix}")
    return dataclasses.replace(train, grad_accum=saved.global_batch // per_micro)


def describe(tag_dir: Path, saved: SavedGeometry, world: int, train) -> str:
    zero = "" if saved.zero_stage is None else f", ZeRO-{saved.zero_stage}"
    return (f"resuming {tag_dir} (written on {saved.world} ranks{zero}) on {world}: "
            f"global batch {saved.global_batch} = micro-batch {train.micro_batch_size} x grad_accum "
            f"{train.grad_accum} x {world} ranks")


def needs_universal(saved: SavedGeometry, world: int, zero_stage: int) -> bool:
    """ZeRO-partitioned optimizer state written on other ranks or another stage needs conversion."""
    if saved.zero_stage is None:
        return saved.world != world
    if saved.zero_stage == 0 or zero_stage == 0:
        if saved.zero_stage != zero_stage:
            raise CompTError(f"the checkpoint was written with ZeRO stage {saved.zero_stage} and this run uses "
                             f"{zero_stage}: set train.zero_stage: {saved.zero_stage} to resume it")
        return False
    return saved.world != world or saved.zero_stage != zero_stage


def universal_tag(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


COMPLETE_MARKER = "compt_universal_complete"   # written last: a dir without it is junk, rebuilt


def convert_to_universal(ckpt_dir: Path, tag: str, log: Path) -> str:
    """DeepSpeed's ds_to_universal on `tag` (rank 0 only; a subprocess, so its worker pool never forks
    a process holding a process group). Returns the universal tag; reuses a finished conversion (one
    with its completion marker; anything else under that name is removed and rebuilt)."""
    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / universal_tag(tag)
    if (out / COMPLETE_MARKER).is_file():
        return out.name
    if out.exists():
        print(f"[resume] {out} is incomplete (no {COMPLETE_MARKER}): rebuilding it", file=sys.stderr, flush=True)
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp = ckpt_dir / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    # ds_to_universal points `latest_universal` next to its output at the temp name: not ours to keep.
    (ckpt_dir / "latest_universal").unlink(missing_ok=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CompTError(f"checkpoint {ckpt_dir / tag}: conversion to a universal checkpoint failed "
                         f"(exit {r.returncode}); DeepSpeed's output is in {log}")
    (tmp / COMPLETE_MARKER).write_text(tag + "\n")
    tmp.rename(out)
    return out.name


def convert_first_good(ckpt_dir: Path, tags: list[str], log: Path) -> str:
    """Convert the first of `tags` (best first, all of one geometry) that converts; a broken one is
    skipped with one line, like a regular resume falls back to the previous kept checkpoint."""
    errors = []
    for tag in tags:
        try:
            universal = convert_to_universal(ckpt_dir, tag, log)
        except CompTError as e:
            errors.append(str(e))
            continue
        if errors:
            print(f"[resume] {errors[-1]}; resuming from {Path(ckpt_dir) / tag} instead", file=sys.stderr,
                  flush=True)
        return universal
    raise CompTError(errors[0] if len(errors) == 1 else
                     f"no convertible checkpoint in {ckpt_dir}: {errors[0]} (and {len(errors) - 1} older)")


def drop_universal(ckpt_dir: Path) -> None:
    """After a regular save: the converted copies are no longer needed."""
    for p in Path(ckpt_dir).glob(f"global_step*{UNIVERSAL_SUFFIX}"):
        shutil.rmtree(p, ignore_errors=True)
