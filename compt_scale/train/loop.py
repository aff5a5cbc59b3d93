"""The training loop of one stage, on a DeepSpeed engine. Reads top to bottom:

set up engine -> resume or calibrate alpha -> for each step: micro-batches, backward, step, log,
eval (and alpha: auto re-calibrated), checkpoint, preemption check -> final eval -> probe logits -> export.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import ChainSpec, IFDSpec, TrainSpec
from ..data.loader import PrefetchLoader, first_batches
from ..errors import EXIT_PREEMPTED, CompTError
from . import checkpoint, ds_patches, lr_rule, preemption
from .distributed import all_reduce_mean, device
from .host_memory import release_freed_host_memory
from .metrics import MetricsLog, StepLosses, Throughput, mfu, peak_flops
from .objective import AutoAlpha, FrozenTeacher, StudentWithIFD, alpha_at, calibrate_alpha
from .speedups import apply_speedups
from .step import train_step

if TYPE_CHECKING:   # families sit above train (the layers contract); the annotation only
    from ..families.base import Family


@dataclass
class LoopConfig:
    stage: str
    seed: int
    steps: int
    family: Family                  # dataset, losses, features, probe
    spec: ChainSpec                 # the family reads its data section
    tokens_per_sample: int
    macs_per_step: float            # student train + teacher forward, for the whole world batch
    train: TrainSpec
    ifd: IFDSpec
    ds_config: dict
    stage_dir: Path
    data_dir: Path
    resume: bool = False
    universal_tag: str | None = None   # resume from this converted checkpoint (another world size)
    heartbeat: Callable[[], None] = lambda: None   # keeps the stage lock fresh (called as metrics are written)


def lr_lambda(train, steps: int):
    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = min(1.0, (step - train.warmup_steps) / max(1, steps - train.warmup_steps))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def to_device(batch) -> tuple:
    return tuple(v.to(device()) for v in batch)


def evaluate(module, val, cfg: LoopConfig) -> float:
    """Mean task loss over the first `eval_batches` global batches of the validation set: the same
    samples on any number of ranks (a resume on another world size keeps the global batch)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mb, micro_steps = cfg.train.micro_batch_size, cfg.train.eval_batches * cfg.train.grad_accum
    total = torch.zeros((), dtype=torch.float64, device=device())
    module.eval()
    with torch.no_grad():
        for b in range(micro_steps):
            idx = [(b * world * mb + rank * mb + j) % len(val) for j in range(mb)]
            task, _ = module(to_device(val.batch(idx)))
            total += task.detach().double()  # summed on the device: one read-back per eval
    module.train()
    return all_reduce_mean(total.item() / micro_steps)


def build_engine(student_with_ifd: StudentWithIFD, teacher: FrozenTeacher | None, cfg: LoopConfig):
    """liger / torch.compile applied (blocks compiled before DeepSpeed wraps the model: the compiled
    forwards run inside the engine's hooks, under every ZeRO stage), then the DeepSpeed engine."""
    t = cfg.train
    applied = apply_speedups(student_with_ifd.student, teacher, t, cfg.family,
                             cfg.family.config_of(student_with_ifd.student), cfg.ds_config["zero_optimization"]["stage"])
    if dist.get_rank() == 0 and (applied["liger"] or applied["compile"]):
        print(f"[{cfg.stage}] liger: {applied['liger']}, torch.compile: {applied['compile']}", flush=True)
    ds_patches.install()
    engine, _, _, _ = deepspeed.initialize(
        model=student_with_ifd,   # muP-style lr per model size (train/lr_rule.py)
        model_parameters=lr_rule.param_groups(student_with_ifd, t, cfg.family.config_of(student_with_ifd.student),
                                              cfg.spec.family),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, cfg.steps)),
        config=cfg.ds_config)
    release_freed_host_memory()   # the partitions DeepSpeed copied into its flat buffers (host_memory.py)
    return engine


def _start_state(engine, teacher: FrozenTeacher | None, train_data, cfg: LoopConfig) -> tuple[dict, int | None]:
    """(loop state, the step resumed from or None): from the checkpoint, else a fresh state whose
    IFD weight alpha is fixed, scheduled or calibrated (`auto`) on the first batches."""
    loop = checkpoint.load(engine, cfg.stage_dir / "checkpoints", cfg.universal_tag) if cfg.resume else None
    if loop is not None:
        return loop, loop["step"]
    alpha, t = 0.0, cfg.train
    if teacher is not None and cfg.ifd.enabled:
        if cfg.ifd.alpha == "auto":
            # Each rank its own share of the first steps' data: a multi-rank contrastive loss
            # would see duplicated pairs if every rank used the same batches.
            rank, world = dist.get_rank(), dist.get_world_size()
            calib = [to_device(b) for b in first_batches(train_data, seed=cfg.seed, count=cfg.ifd.calib_batches,
                                                         micro_batch=t.micro_batch_size, rank=rank, world=world)]
            alpha = calibrate_alpha(engine.module, teacher, calib, cfg.ifd.ratio, reduce=all_reduce_mean)
        else:
            alpha = alpha_at(cfg.ifd.alpha, 0.0, 0, cfg.steps) if isinstance(cfg.ifd.alpha, dict) \
                else float(cfg.ifd.alpha)
    return {"step": 0, "alpha": alpha, "gpu_seconds": 0.0}, None


@dataclass
class _Run:
    """What the step loop reads and updates: the engine, the data, the logs and the IFD weight."""
    engine: Any
    teacher: FrozenTeacher | None
    cfg: LoopConfig
    val_data: Any
    log: MetricsLog
    auto: AutoAlpha | None
    alpha: float
    start: int
    tokens_per_step: int
    geometry: dict
    gpu_s0: float
    t0: float = field(default_factory=time.time)

    def gpu_seconds(self) -> float:
        """This stage's own wall clock since the loop began (evals and checkpoints included; start-up,
        growth and export not) x ranks, carried across resumes in the checkpoint's loop state."""
        return self.gpu_s0 + (time.time() - self.t0) * dist.get_world_size()

    def loop_state(self, step: int) -> dict:
        return {"step": step, "alpha": self.alpha, "gpu_seconds": self.gpu_seconds(),
                **(self.auto.state() if self.auto is not None else {})}


def train_stage(student_with_ifd: StudentWithIFD, teacher: FrozenTeacher | None, cfg: LoopConfig) -> dict:
    """Train one stage to cfg.steps (resuming when asked); returns the final figures and the engine."""
    world, t = dist.get_world_size(), cfg.train
    train_data = cfg.family.dataset(cfg.spec, cfg.data_dir, "train")
    checkpoint.check_writable(cfg.stage_dir / "checkpoints")   # a read-only dir: one line, before any step
    engine = build_engine(student_with_ifd, teacher, cfg)
    loop, resumed_from = _start_state(engine, teacher, train_data, cfg)
    # alpha: auto is re-set at every eval from the steps since the previous one (objective.AutoAlpha),
    # unless ifd.recalibrate is false (then the first calibration holds for the whole stage)
    auto = AutoAlpha(loop) if (cfg.ifd.alpha == "auto" and cfg.ifd.recalibrate and teacher is not None
                               and cfg.ifd.enabled) else None
    run = _Run(engine, teacher, cfg, cfg.family.dataset(cfg.spec, cfg.data_dir, "val"),
               MetricsLog(cfg.stage_dir, resumed_from, cfg.heartbeat), auto, loop["alpha"], loop["step"],
               t.micro_batch_size * t.grad_accum * world * cfg.tokens_per_sample,
               {"world": world, "train": t, "zero_stage": cfg.ds_config["zero_optimization"]["stage"]},
               float(loop.get("gpu_seconds", 0.0)))
    if _run_steps(run, train_data):
        run.log.close()
        raise SystemExit(EXIT_PREEMPTED)
    return _finish(run)


def _run_steps(run: _Run, train_data) -> bool:
    """The step loop from run.start to cfg.steps; True when a preemption signal stopped it (after a
    checkpoint). The step body only queues work: losses stay on the device, nothing waits for it."""
    cfg, t, engine = run.cfg, run.cfg.train, run.engine
    rank, world = dist.get_rank(), dist.get_world_size()
    preempt = preemption.install()  # usually already installed by `stage`, first thing
    losses, speed = StepLosses(device(), t.grad_accum), Throughput(run.start)
    # MFU counts the student's model FLOPs only (metrics.py); null on CPU and unknown devices.
    flops_per_token = cfg.family.flops_per_token(cfg.family.config_of(engine.module.student), cfg.spec)
    peak = peak_flops(device())
    batches = PrefetchLoader(train_data, seed=cfg.seed, start=run.start, steps=cfg.steps, grad_accum=t.grad_accum,
                             micro_batch=t.micro_batch_size, rank=rank, world=world, device=device())
    # Context managers: the bar is closed before an error line is printed, never after it, and the
    # prefetch thread is stopped on every way out.
    with tqdm(total=cfg.steps, initial=run.start, desc=cfg.stage, disable=rank != 0, dynamic_ncols=True) as bar, \
            batches:
        run.t0 = time.time()
        for step in range(run.start, cfg.steps):
            losses.start_step()
            if run.teacher is not None and cfg.ifd.enabled:
                run.alpha = alpha_at(cfg.ifd.alpha, run.alpha, step, cfg.steps)
            train_step(engine, run.teacher, batches, run.alpha, losses, t.grad_accum,
                       use_teacher=run.teacher is not None and run.alpha > 0)
            if run.auto is not None:  # device scalars, read back at the next eval (no sync here)
                run.auto.observe(losses.task.clone(), losses.ifd.clone(), run.alpha)
            done = step + 1
            losses.end_step(done)
            bar.update(1)
            log_now = done % t.log_every == 0 or done == 1
            eval_now = done % t.eval_every == 0 and done < cfg.steps
            save_now = done % t.save_every == 0
            if not (log_now or eval_now or save_now or done == cfg.steps):
                continue
            # The host decides only here: non-finite loss and preemption in one collective (so a
            # signal is acted on at the next log/eval/save step).
            st = losses.sync(preempt.requested)
            if st["bad_step"] is not None:
                raise CompTError(f"stage {cfg.stage}: loss is not finite at step {st['bad_step']} "
                                 f"(task {st['bad_task']:.4g}, ifd {st['bad_ifd']:.4g}); earlier checkpoints kept")
            rec = {"step": done, "tokens": done * run.tokens_per_step, "macs": done * cfg.macs_per_step,
                   "gpu_seconds": run.gpu_seconds()}
            if log_now:
                rate = speed.rate(done, run.tokens_per_step)
                run.log.write({**rec, "loss": st["task"] + st["ifd"], "task_loss": st["task"], "ifd_loss": st["ifd"],
                               "lr": engine.get_lr()[0], "alpha": run.alpha, "tokens_per_s": rate,
                               "mfu": mfu(flops_per_token, rate, peak, world)})
                bar.set_postfix(loss=f"{st['task']:.3f}", ifd=f"{st['ifd']:.3f}")
            if eval_now:
                _eval_and_log(run, rec)
            if save_now or st["stop"]:
                checkpoint.save(engine, cfg.stage_dir / "checkpoints", done, run.loop_state(done), run.geometry)
            speed.pause(done)  # eval and checkpoints are not training throughput
            if st["stop"]:
                return True
    return False


def _eval_and_log(run: _Run, rec: dict) -> None:
    cfg = run.cfg
    val = evaluate(run.engine, run.val_data, cfg)
    evrec = {**rec, "val_loss": val, **cfg.family.evaluate(run.engine.module.student, cfg.spec, cfg.data_dir, val)}
    if run.auto is not None:  # the alpha of the steps from here to the next eval
        run.alpha = run.auto.recalibrate(run.alpha, cfg.ifd.ratio, reduce=all_reduce_mean)
        evrec["alpha"] = run.alpha
    run.log.write(evrec)


def _finish(run: _Run) -> dict:
    """The final eval, metrics line, checkpoint and probe; the stage exports from the returned engine."""
    cfg, engine = run.cfg, run.engine
    final_val = evaluate(engine, run.val_data, cfg)
    final_metrics = cfg.family.evaluate(engine.module.student, cfg.spec, cfg.data_dir, final_val)
    final_gpu_s = run.gpu_seconds() if run.start < cfg.steps else run.gpu_s0
    tokens = cfg.steps * run.tokens_per_step
    run.log.write({"final": True, "step": cfg.steps, "tokens": tokens, "macs": cfg.steps * cfg.macs_per_step,
                   "gpu_seconds": final_gpu_s, "val_loss": final_val, **final_metrics})
    run.log.close()
    if run.start < cfg.steps:  # a finished run resumed again has nothing new to checkpoint
        checkpoint.save(engine, cfg.stage_dir / "checkpoints", cfg.steps,
                        {"step": cfg.steps, "alpha": run.alpha, "gpu_seconds": final_gpu_s}, run.geometry)
    probe = probe_outputs(engine, run.val_data, cfg.family)
    return {"final_val_loss": final_val, "eval": final_metrics, "steps": cfg.steps, "tokens": tokens,
            "alpha": run.alpha, "engine": engine, "probe_logits": probe, "seconds": time.time() - run.t0,
            "gpu_seconds": final_gpu_s}


def probe_outputs(engine, val, family) -> torch.Tensor | None:
    """The trained engine's outputs on a fixed batch, kept so tests can check the export against it."""
    engine.eval()
    with torch.no_grad():
        out = family.probe(engine.module.student, to_device(val.batch([0, 1]))).cpu()
    engine.train()
    return out if dist.get_rank() == 0 else None
