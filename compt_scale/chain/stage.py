"""One stage of a chain (what `compt-scale stage` and each SLURM job run):

plan (chain/plan.py: every decision, made once) -> materialize the student, grown from its source,
and the frozen teacher (the family's ModelIO) -> train on DeepSpeed with task + IFD -> export through
the family's one export path -> manifest updated.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import ChainSpec
from ..errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, CompTError
from ..families import get_family
from ..train import init_rule, lr_rule, preemption
from ..train.checkpoint import KEEP_CHECKPOINTS
from ..train.distributed import init_distributed
from ..train.ds_config import describe
from ..train.host_memory import map_large_blocks, release_freed_host_memory
from .diskspace import check_free_space, free_space, out_of_space
from .lock import StageLock, heartbeat
from .manifest import Manifest
from .memory_log import record_memory
from .plan import StagePlan, plan_stage


def data_dir_for(spec: ChainSpec, out: Path) -> Path:
    return Path(spec.data.cache_dir) if spec.data.cache_dir else out / "data"


def predecessor_export(spec: ChainSpec, name: str, out: Path):
    """(predecessor StageSpec, its finished export dir), or (None, None) for a first stage / baseline."""
    pred = spec.predecessor(name)
    if pred is None:
        return None, None
    rec = Manifest(out).stage(pred.name)
    export = out / pred.name / "model"
    if rec.get("status") != "done" or not export.is_dir():
        raise CompTError(f"stage {name}: predecessor {pred.name!r} has no finished export at {export} "
                         f"(status: {rec.get('status', 'never run')})")
    return pred, export


def _loading(name: str, export: Path, load, what: str = "predecessor export"):
    """Run `load` (reading a predecessor export or an init: dir); a broken file is one line."""
    from safetensors import SafetensorError  # a truncated or corrupt model.safetensors
    try:
        return load()
    except (CompTError, OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise CompTError(f"stage {name}: cannot load {what} {export}: {str(e).splitlines()[0]}") from None


def _drop_startup_leftovers(stage_dir: Path) -> None:
    """A stage that failed before training started leaves no directory behind (the manifest holds
    the error): a half-made stage dir would only confuse the next run."""
    if stage_dir.is_dir() and not any((stage_dir / k).exists() for k in ("checkpoints", "model", "metrics.jsonl")):
        for p in sorted(stage_dir.rglob("*"), reverse=True):
            if p.name != ".lock":
                p.rmdir() if p.is_dir() else p.unlink()


def run_stage(spec: ChainSpec, name: str, out: Path, resume: bool = False) -> dict:
    out = Path(out)
    preemption.install()  # normally done first thing by `stage`; here for direct callers
    spec.stage(name)  # unknown name -> one-line error before any set-up
    stage_dir = out / name
    if not resume and (stage_dir / "checkpoints").exists():
        raise CompTError(f"{stage_dir} already has checkpoints; pass --resume to continue it or use a new --out")
    rank, world = init_distributed()
    lock = _lock_stage(stage_dir, name, rank)
    manifest = Manifest(out)
    try:
        preemption.check_startup("start")
        if rank == 0:
            manifest.reserve(name)
        result = _run(spec, name, out, stage_dir, resume, rank, world, manifest)
    except CompTError as e:
        if rank == 0:
            manifest.update_stage(name, status="failed", error=str(e))
            _drop_startup_leftovers(stage_dir)
        raise
    except SystemExit as e:
        if e.code == EXIT_PREEMPTED and rank == 0:
            manifest.update_stage(name, status="preempted")
            print(f"[{name}] preempted ({preemption.install().signal}): exiting {EXIT_PREEMPTED}, "
                  f"resume with --resume", file=sys.stderr, flush=True)
        raise
    except Exception as e:
        if not out_of_space(e, stage_dir):
            _record_crash(manifest, name, rank, e)
            raise
        if rank == 0:
            _drop_partial_checkpoint(stage_dir / "checkpoints")
        msg = (f"stage {name}: no space left on device at {stage_dir} ({free_space(stage_dir)} free after "
               f"removing the unfinished checkpoint); earlier checkpoints kept")
        if rank == 0:
            manifest.update_stage(name, status="failed", error=msg)
        raise CompTError(msg) from None
    except BaseException as e:
        _record_crash(manifest, name, rank, e)
        raise
    finally:
        if lock is not None:
            lock.release()
        if rank == 0:
            manifest.release_reserve(name)
        if rank == 0 and stage_dir.is_dir() and not any(stage_dir.iterdir()):
            stage_dir.rmdir()
    return result


def _record_crash(manifest, name, rank, e: BaseException) -> None:
    if rank == 0:
        manifest.update_stage(name, status="failed", error=f"{type(e).__name__}: {e}"[:500])
        traceback.print_exc()


def _lock_stage(stage_dir: Path, name: str, rank: int):
    """Rank 0 takes the stage lock; every rank stops (exit 2, rank 0 saying why) if it is held."""
    from ..train.distributed import all_reduce_flags
    lock, error = None, None
    if rank == 0:
        try:
            lock = StageLock(stage_dir, name).acquire()
        except CompTError as e:
            error = e
    (held,) = all_reduce_flags(error is not None)
    if error is not None:
        raise error
    if held:
        raise SystemExit(EXIT_BAD_INPUT)
    return lock


def _drop_partial_checkpoint(ckpt_dir: Path) -> None:
    """After ENOSPC mid-save: remove checkpoint dirs newer than `latest` (never loaded, half written)."""
    from ..train.checkpoint import read_latest
    latest = read_latest(ckpt_dir)
    if not ckpt_dir.is_dir() or (latest is None and (ckpt_dir / "latest").exists()):
        return  # an unreadable `latest`: leave the dirs to the resume fallback
    newest = int(latest.removeprefix("global_step")) if latest else -1
    for p in ckpt_dir.glob("global_step*"):
        if p.name.removeprefix("global_step").isdigit() and int(p.name.removeprefix("global_step")) > newest:
            shutil.rmtree(p, ignore_errors=True)


def _universal_tag(ckpt_dir, tag, saved, world, train, ds_config, rank, name) -> str | None:
    """A checkpoint from another world size or ZeRO stage: converted (rank 0) to DeepSpeed's
    universal format, which the engine is then told to load. None: load as it is."""
    from ..train.checkpoint import candidates
    from ..train.distributed import all_reduce_flags, broadcast_text
    from ..train.world_size_resume import convert_first_good, describe, needs_universal, read_geometry
    if saved is None or not needs_universal(saved, world, ds_config["zero_optimization"]["stage"]):
        return None
    error, universal = None, None
    if rank == 0:
        print(f"[{name}] {describe(ckpt_dir / tag, saved, world, train)}; converting it to a universal "
              f"checkpoint", flush=True)
        try:
            # A broken newest checkpoint falls back to an older one of the same geometry.
            tags = [t for t in candidates(ckpt_dir) if t == tag or read_geometry(ckpt_dir / t, train) == saved]
            universal = convert_first_good(ckpt_dir, tags[tags.index(tag):],
                                           ckpt_dir.parent / "universal_conversion.log")
        except CompTError as e:
            error = e
    (failed,) = all_reduce_flags(error is not None)   # also the barrier: every rank waits for the files
    if error is not None:
        raise error
    if failed:
        raise SystemExit(EXIT_BAD_INPUT)
    ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return broadcast_text(universal if rank == 0 else None)


def _run(spec, name, out, stage_dir, resume, rank, world, manifest) -> dict:
    """plan -> materialize the student (and teacher) -> train -> export -> record."""
    from ..train.distributed import device
    from ..train.loop import LoopConfig, train_stage
    from ..train.objective import StudentWithIFD
    family = get_family(spec.family)
    record_memory(stage_dir, rank, "start")   # the imports' peak: the baseline of the others
    data_dir = family.prepare(spec, data_dir_for(spec, out))
    preemption.check_startup("data preparation")  # a collective: also the barrier after preparation
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        manifest.update_stage(name, status="running", error=None, world_size=world,
                              job_id=os.environ.get("SLURM_JOB_ID"))
    predecessor_export(spec, name, out)   # a finished predecessor, or one line
    resume_at = _resume_point(stage_dir / "checkpoints", resume, spec.train_for(spec.stage(name)), world)
    plan = plan_stage(spec, name, world, out=out, data_dir=data_dir, train=resume_at.train)
    ds_config = plan.fresh_ds_config()
    if device().type == "cpu" and ds_config.get("zero_optimization", {}).get("stage") == 3:
        # ZeRO-3 on CPU ranks: freed gathered parameters go back to the OS (train/host_memory.py). Not
        # under ZeRO 0-2: there it only makes every large activation a fresh mapping (2x per step,
        # measured on the demo's m), with no gathered parameters to give back.
        map_large_blocks()
    student, teacher, heads = _materialize(family, plan, ds_config, stage_dir, rank)
    release_freed_host_memory()   # the build's freed full-size tensors (train/host_memory.py)
    check_free_space(stage_dir, plan.params, keep=KEEP_CHECKPOINTS)
    universal = _universal_tag(stage_dir / "checkpoints", resume_at.tag, resume_at.saved, world, plan.train,
                               ds_config, rank, name)
    if rank == 0:
        print(f"[{name}] {plan.params / 1e6:.2f}M params, {plan.steps} steps x {plan.samples_per_step} "
              f"samples, {describe(plan.params, plan.train, list(plan.memory))}, teacher: "
              f"{plan.source.stage if plan.teacher is not None and plan.source else 'none'}", flush=True)
    loop_cfg = LoopConfig(stage=name, seed=spec.seed, steps=plan.steps, family=family, spec=spec,
                          tokens_per_sample=family.tokens_per_sample(spec),
                          macs_per_step=plan.macs_per_step["macs"], train=plan.train, ifd=plan.ifd,
                          ds_config=ds_config, stage_dir=stage_dir, data_dir=data_dir, resume=resume,
                          universal_tag=universal, heartbeat=heartbeat)
    result = train_stage(StudentWithIFD(family, student, heads), teacher, loop_cfg)
    engine = result.pop("engine")
    record_memory(stage_dir, rank, "trained", engine=engine)
    _export(family, plan, engine, data_dir, stage_dir / "model", rank)
    record_memory(stage_dir, rank, "exported")
    if rank == 0:
        torch.save(result["probe_logits"], stage_dir / "probe_logits.pt")
        _record_done(manifest, plan, result, ds_config)
    dist.barrier()
    return result


def _dtype(train) -> torch.dtype:
    return torch.bfloat16 if train.precision == "bf16" else torch.float32


def _materialize(family, plan: StagePlan, ds_config: dict, stage_dir: Path, rank: int):
    """(student, frozen teacher or None, IFD heads or None), as the plan says, with the growth report
    written to stage_dir/growth.json."""
    from ..train.distributed import device
    from ..train.objective import FrozenTeacher
    io, src = family.io, plan.source
    student = io.build_student(plan.student, plan.seed, ds_config)
    if plan.train.zero_init_residual and not plan.grown:
        init_rule.zero_residual_outputs(student, plan.student)
    record_memory(stage_dir, rank, "built", student)
    if plan.grown:
        assert src is not None and src.path is not None  # grown: from its source (the run plans with --out)
        what = "predecessor export" if src.kind == "predecessor" else "init: model"
        report = _loading(plan.name, src.path,
                          lambda: io.fill(student, src.path, src.config, plan.student, plan.growth), what)
        record_memory(stage_dir, rank, "grown", student)
        report["config_changes"] = plan.config_changes   # made by the plan, before the student was built
        if rank == 0:
            (stage_dir / "growth.json").write_text(json.dumps(report, indent=2, default=str))
    teacher, heads = None, None
    if plan.teacher is not None:
        assert src is not None and src.path is not None  # the teacher: the predecessor's export on disk
        dtype = _dtype(plan.train)
        t_model, partitioned = _loading(plan.name, src.path, lambda: io.load_teacher(
            src.path, dtype, ds_config, plan.replicate_teacher))
        teacher = FrozenTeacher(family, t_model, dtype, device(), partitioned=partitioned)
        heads = io.ifd_heads(plan.student, plan.teacher, plan.ifd, ds_config)
    if plan.train.activation_checkpointing:
        family.enable_activation_checkpointing(student)
    preemption.check_startup("model build and growth")
    return student, teacher, heads


def _export(family, plan: StagePlan, engine, data_dir: Path, out: Path, rank: int) -> None:
    """The family's one export path; an `init:` model used as-is is exported unchanged."""
    if plan.steps == 0 and plan.source is not None and plan.source.kind == "init":
        if rank == 0:
            family.io.export_as_is(plan.source.path, data_dir, out)
        return
    family.io.export(engine.module.student, engine, _dtype(plan.train), data_dir, out, plan.train.export_shard_bytes)


def _record_done(manifest: Manifest, plan: StagePlan, result: dict, ds_config: dict) -> None:
    cost = plan.cost()
    manifest.update_stage(
        plan.name, status="done", params=plan.params, tokens=result["tokens"], steps=plan.steps,
        train_macs=cost["train_macs"], teacher_macs=cost["teacher_macs"], macs=cost["macs"],
        final_val_loss=result["final_val_loss"], alpha=result["alpha"], export=f"{plan.name}/model",
        teacher=plan.source.stage if plan.source is not None else None,   # the predecessor (None: init: or first)
        seconds=result["seconds"], gpu_seconds=result["gpu_seconds"], growth=plan.growth.__dict__ if plan.source and plan.source.kind == "predecessor"
        else None, zero_stage=ds_config["zero_optimization"]["stage"],
        init=plan.init,
        **lr_rule.describe(plan.train, plan.student, plan.spec.family))


@dataclass(frozen=True)
class ResumePoint:
    tag: str | None          # the checkpoint to continue from (None: a fresh start)
    saved: Any               # its geometry (world, micro-batch, grad_accum, ZeRO stage)
    train: Any               # the TrainSpec re-split for this world size (the same global batch)


def _resume_point(ckpt_dir: Path, resume: bool, train, world: int) -> ResumePoint:
    """Resuming on another world size keeps the checkpoint's global batch: grad_accum is re-split."""
    from ..train.checkpoint import candidates
    from ..train.world_size_resume import read_geometry, resplit
    tag = next(iter(candidates(ckpt_dir)), None) if resume else None
    saved = read_geometry(ckpt_dir / tag, train) if tag else None
    return ResumePoint(tag, saved, resplit(saved, world, train, ckpt_dir / str(tag)))
