"""One stage of a chain (what `compt-scale stage` and each SLURM job run):

teacher = export of the predecessor, frozen -> student = family.build(config) -> weights = grow(teacher)
-> train on DeepSpeed with task + IFD -> export HF dir + metrics, manifest updated.
"""
from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ChainSpec
from ..errors import EXIT_PREEMPTED, CompTError
from ..families import get_family
from ..train.distributed import device, init_distributed
from .manifest import Manifest


def data_dir_for(spec: ChainSpec, out: Path) -> Path:
    return Path(spec.data.cache_dir) if spec.data.cache_dir else out / "data"


def steps_for(spec: ChainSpec, name: str, world: int) -> int:
    stage = spec.stage(name)
    t = spec.train_for(stage)
    per_step = t.micro_batch_size * t.grad_accum * world * get_family(spec.family).tokens_per_sample(spec)
    return max(1, -(-stage.tokens // per_step))


def load_teacher(spec: ChainSpec, name: str, out: Path):
    """The predecessor's export (or None for the first stage and for baselines)."""
    pred = spec.predecessor(name)
    if pred is None:
        return None, None
    rec = Manifest(out).stage(pred.name)
    export = out / pred.name / "model"
    if rec.get("status") != "done" or not export.is_dir():
        raise CompTError(f"stage {name}: predecessor {pred.name!r} has no finished export at {export} "
                         f"(status: {rec.get('status', 'never run')})")
    try:
        model = get_family(spec.family).load_export(export)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CompTError(f"stage {name}: cannot load predecessor export {export}: {str(e).splitlines()[0]}") from None
    return pred, model


def run_stage(spec: ChainSpec, name: str, out: Path, resume: bool = False) -> dict:
    out = Path(out)
    spec.stage(name)  # unknown name -> one-line error before any set-up
    stage_dir = out / name
    if not resume and (stage_dir / "checkpoints").exists():
        raise CompTError(f"{stage_dir} already has checkpoints; pass --resume to continue it or use a new --out")
    rank, world = init_distributed()
    manifest = Manifest(out)
    try:
        result = _run(spec, name, out, stage_dir, resume, rank, world, manifest)
    except CompTError as e:
        if rank == 0:
            manifest.update_stage(name, status="failed", error=str(e))
        raise
    except SystemExit as e:
        if e.code == EXIT_PREEMPTED and rank == 0:
            manifest.update_stage(name, status="preempted")
        raise
    except BaseException as e:
        if rank == 0:
            manifest.update_stage(name, status="failed", error=f"{type(e).__name__}: {e}"[:500])
            traceback.print_exc()
        raise
    return result


def _run(spec, name, out, stage_dir, resume, rank, world, manifest) -> dict:
    from ..grow import grow_state
    from ..kernels import IFDProjection
    from ..train.ds_config import build_ds_config, describe
    from ..train.loop import LoopConfig, train_stage
    from ..train.objective import FrozenTeacher, StudentWithIFD

    stage = spec.stage(name)
    family = get_family(spec.family)
    data_dir = family.prepare(spec, data_dir_for(spec, out))
    dist.barrier()
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        manifest.update_stage(name, status="running", error=None, world_size=world,
                              job_id=os.environ.get("SLURM_JOB_ID"))
    cfg = family.model_config(spec, stage, data_dir)
    train, ifd, growth = spec.train_for(stage), spec.ifd_for(stage), spec.growth_for(stage)
    student = family.build(cfg, seed=spec.seed + 1000 * (spec.index(name) + 1))
    if train.activation_checkpointing:
        family.enable_activation_checkpointing(student)
    pred, teacher_model = load_teacher(spec, name, out)
    teacher, heads = None, None
    if teacher_model is not None:
        t_cfg = family.config_of(teacher_model)
        grown, growth_report = grow_state(teacher_model.state_dict(), t_cfg, cfg, student.state_dict(),
                                          width=growth.width, depth=growth.depth)
        student.load_state_dict(grown)
        if rank == 0:
            (stage_dir / "growth.json").write_text(json.dumps(growth_report, indent=2, default=str))
        if ifd.enabled:
            dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
            teacher = FrozenTeacher(family, teacher_model, dtype, device())
            heads = [IFDProjection(d_s, d_t) for d_s, d_t in zip(family.feature_dims(cfg), family.feature_dims(t_cfg))]
    n_params = sum(p.numel() for p in student.parameters())
    steps = steps_for(spec, name, world)
    samples_per_step = train.micro_batch_size * train.grad_accum * world
    macs = family.stage_macs(cfg, teacher.config if teacher else None, spec, samples_per_step)
    ds_config = build_ds_config(n_params, train, world)
    if rank == 0:
        print(f"[{name}] {n_params / 1e6:.2f}M params, {steps} steps x {samples_per_step} samples, "
              f"{describe(n_params, train)}, teacher: {pred.name if pred else 'none'}", flush=True)
    loop_cfg = LoopConfig(stage=name, seed=spec.seed, steps=steps, family=family, spec=spec,
                          tokens_per_sample=family.tokens_per_sample(spec), macs_per_step=macs["macs"],
                          train=train, ifd=ifd, ds_config=ds_config, stage_dir=stage_dir, data_dir=data_dir,
                          resume=resume)
    result = train_stage(StudentWithIFD(family, student, heads), teacher, loop_cfg)
    if rank == 0:
        torch.save(result["probe_logits"], stage_dir / "probe_logits.pt")
        family.export(student, result["state"], data_dir, stage_dir / "model")
        per_step_teacher = macs["teacher_macs"]
        manifest.update_stage(
            name, status="done", params=n_params, tokens=result["tokens"], steps=steps,
            train_macs=(macs["macs"] - per_step_teacher) * steps, teacher_macs=per_step_teacher * steps,
            macs=macs["macs"] * steps, final_val_loss=result["final_val_loss"], alpha=result["alpha"],
            export=f"{name}/model", teacher=pred.name if pred else None, seconds=result["seconds"],
            growth=growth.__dict__ if pred else None, zero_stage=ds_config["zero_optimization"]["stage"])
    dist.barrier()
    return result
