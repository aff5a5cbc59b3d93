"""One stage of a chain (what `compt-scale stage` and each SLURM job run):

teacher = export of the predecessor, frozen -> student = family.build(config) -> weights = grow(teacher)
-> train on DeepSpeed with task + IFD -> export HF dir + metrics, manifest updated.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ChainSpec
from ..errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, CompTError
from ..families import get_family
from ..train import preemption
from ..train.checkpoint import KEEP_CHECKPOINTS
from ..train.distributed import device, init_distributed
from .diskspace import check_free_space, free_space, out_of_space
from .lock import StageLock
from .manifest import Manifest
from .planner import samples_per_step as samples_per_step_of
from .planner import steps_for


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


def memory_needs(family, spec, train, cfg, teacher_cfg, n_params: int, world: int) -> list:
    """Per-GPU need of each preset (train/memory.py), from which `zero_stage: auto` picks."""
    from ..train import memory
    towers, largest = family.memory_shape(cfg, spec)
    acts = memory.activations(towers, train.micro_batch_size, train.activation_checkpointing)
    t_params = family.param_count(teacher_cfg) if teacher_cfg is not None else 0
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return memory.needs(n_params, largest, world, per_node, acts, t_params)


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
            manifest.reserve()
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
    from ..grow import grow_state
    from ..grow.registry import plan
    from ..train.checkpoint import candidates, gather_student_state
    from ..train.ds_config import build_ds_config, describe
    from ..train.loop import LoopConfig, train_stage
    from ..train.objective import FrozenTeacher, StudentWithIFD
    from ..train.world_size_resume import read_geometry, resplit
    from . import weights

    stage = spec.stage(name)
    family = get_family(spec.family)
    weights.record_memory(stage_dir, rank, "start")   # the imports' peak: the baseline of the others
    data_dir = family.prepare(spec, data_dir_for(spec, out))
    preemption.check_startup("data preparation")  # a collective: also the barrier after preparation
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        manifest.update_stage(name, status="running", error=None, world_size=world,
                              job_id=os.environ.get("SLURM_JOB_ID"))
    cfg = family.model_config(spec, stage, data_dir)
    train, ifd, growth = spec.train_for(stage), spec.ifd_for(stage), spec.growth_for(stage)
    dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
    seed = spec.seed + 1000 * (spec.index(name) + 1)
    pred, export = predecessor_export(spec, name, out)
    teacher, heads, t_cfg, growth_report = None, None, None, None
    # Resuming on another world size keeps the checkpoint's global batch: grad_accum is re-split.
    ckpt_dir = stage_dir / "checkpoints"
    resume_tag = (candidates(ckpt_dir) or [None])[0] if resume else None
    saved = read_geometry(ckpt_dir / resume_tag, train) if resume_tag else None
    train = resplit(saved, world, train, ckpt_dir / str(resume_tag))
    steps = steps_for(spec, stage, stage.tokens, world, train)
    if family.partitioned_io:
        # Built partitioned under ZeRO-3, then filled one parameter at a time from safetensors.
        source = export or (Path(stage.init) if stage.init else None)
        what = "predecessor export" if export else "init: model"
        if source is not None:
            t_cfg = _loading(name, source, lambda: family.load_config(str(source)), what)
            width, depth = growth.width, growth.depth   # an init: of the stage's own size is copied
            # e.g. clone unties tied embeddings: the student must be built with the grown config.
            for k, v in plan(t_cfg, cfg, [], width, depth)[1]["config_changes"].items():
                setattr(cfg, k, v)
        n_params = family.param_count(cfg)
        candidates = memory_needs(family, spec, train, cfg, t_cfg if export else None, n_params, world)
        ds_config = build_ds_config(n_params, train, world, candidates=candidates)
        if train.ds_config is None:
            ds_config = weights.fit_zero3_buckets(ds_config, max(family.feature_dims(cfg)))
        student = weights.build_student(family, cfg, seed, ds_config)
        weights.record_memory(stage_dir, rank, "built", student)
        if source is not None:
            growth_report = _loading(
                name, source, lambda: weights.fill_from(student, source, t_cfg, cfg, width, depth), what)
            weights.record_memory(stage_dir, rank, "grown", student)
        if export is not None and ifd.enabled:
            t_model, partitioned = _loading(name, export, lambda: weights.load_teacher(family, export, dtype,
                                                                                       ds_config))
            teacher = FrozenTeacher(family, t_model, dtype, device(), partitioned=partitioned)
        t_cfg = t_cfg if export else None
    else:
        student = family.build(cfg, seed=seed)
        if export is not None:
            teacher_model = _loading(name, export, lambda: family.load_export(export))
            t_cfg = family.config_of(teacher_model)
            grown, growth_report = grow_state(teacher_model.state_dict(), t_cfg, cfg, student.state_dict(),
                                              width=growth.width, depth=growth.depth)
            student.load_state_dict(grown)
            del grown
            if ifd.enabled:
                teacher = FrozenTeacher(family, teacher_model, dtype, device())
        n_params = sum(p.numel() for p in student.parameters())
        candidates = memory_needs(family, spec, train, cfg, t_cfg if export else None, n_params, world)
        ds_config = build_ds_config(n_params, train, world, candidates=candidates)
    if train.activation_checkpointing:
        family.enable_activation_checkpointing(student)
    preemption.check_startup("model build and growth")
    check_free_space(stage_dir, n_params, keep=KEEP_CHECKPOINTS)
    if growth_report is not None and rank == 0:
        (stage_dir / "growth.json").write_text(json.dumps(growth_report, indent=2, default=str))
    if teacher is not None:
        heads = weights.build_ifd_heads(family, cfg, t_cfg, ifd, ds_config) if family.partitioned_io \
            else family.ifd_heads(cfg, t_cfg, ifd)
    universal = _universal_tag(ckpt_dir, resume_tag, saved, world, train, ds_config, rank, name)
    samples_per_step = samples_per_step_of(spec, stage, world, train)
    macs = family.stage_macs(cfg, teacher.config if teacher else None, spec, samples_per_step)
    if rank == 0:
        print(f"[{name}] {n_params / 1e6:.2f}M params, {steps} steps x {samples_per_step} samples, "
              f"{describe(n_params, train, candidates)}, teacher: {pred.name if pred else 'none'}", flush=True)
    loop_cfg = LoopConfig(stage=name, seed=spec.seed, steps=steps, family=family, spec=spec,
                          tokens_per_sample=family.tokens_per_sample(spec), macs_per_step=macs["macs"],
                          train=train, ifd=ifd, ds_config=ds_config, stage_dir=stage_dir, data_dir=data_dir,
                          resume=resume, universal_tag=universal)
    result = train_stage(StudentWithIFD(family, student, heads), teacher, loop_cfg)
    engine = result.pop("engine")
    weights.record_memory(stage_dir, rank, "trained")
    if stage.init and steps == 0:
        if rank == 0:
            weights.export_as_is(Path(stage.init), data_dir / "tokenizer", stage_dir / "model")
    elif family.partitioned_io:
        weights.export_model(engine.module.student, dtype, data_dir / "tokenizer", stage_dir / "model",
                             train.export_shard_bytes)
    else:
        state = gather_student_state(engine)
        if rank == 0:
            family.export(student, state, data_dir, stage_dir / "model")
        del state
    weights.record_memory(stage_dir, rank, "exported")
    if rank == 0:
        torch.save(result["probe_logits"], stage_dir / "probe_logits.pt")
        per_step_teacher = macs["teacher_macs"]
        manifest.update_stage(
            name, status="done", params=n_params, tokens=result["tokens"], steps=steps,
            train_macs=(macs["macs"] - per_step_teacher) * steps, teacher_macs=per_step_teacher * steps,
            macs=macs["macs"] * steps, final_val_loss=result["final_val_loss"], alpha=result["alpha"],
            export=f"{name}/model", teacher=pred.name if pred else None, seconds=result["seconds"],
            growth=growth.__dict__ if pred else None, zero_stage=ds_config["zero_optimization"]["stage"])
    dist.barrier()
    return result
