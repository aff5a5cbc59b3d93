"""The training loop of one stage, on a DeepSpeed engine. Reads top to bottom:

set up engine -> resume or calibrate alpha -> for each step: micro-batches, backward, step, log,
eval, checkpoint, preemption check -> final eval -> probe logits -> export.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..data.packed import sample_indices
from ..errors import EXIT_PREEMPTED, CompTError
from . import checkpoint
from .distributed import all_reduce_flags, all_reduce_mean, device
from .objective import FrozenTeacher, StudentWithIFD, calibrate_alpha


@dataclass
class LoopConfig:
    stage: str
    seed: int
    steps: int
    family: object                  # the family module: dataset, losses, features, probe
    spec: object                    # ChainSpec (the family reads its data section)
    tokens_per_sample: int
    macs_per_step: float            # student train + teacher forward, for the whole world batch
    train: object                   # TrainSpec
    ifd: object                     # IFDSpec
    ds_config: dict
    stage_dir: Path
    data_dir: Path
    resume: bool = False


class Preemption:
    """SIGUSR1/SIGTERM set a flag; the loop acts on it at the next step boundary on all ranks."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def lr_lambda(train, steps: int):
    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = min(1.0, (step - train.warmup_steps) / max(1, steps - train.warmup_steps))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on norms and biases (1-D), as in GPT/Llama recipes.
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by rank 0 only."""

    def __init__(self, stage_dir: Path, resume_step: int | None):
        self.rank0 = dist.get_rank() == 0
        self.path = stage_dir / "metrics.jsonl"
        if self.rank0:
            lines = self.path.read_text().splitlines() if (resume_step is not None and self.path.is_file()) else []
            # On resume, drop what was logged after the checkpoint: it is about to be redone.
            kept = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= (resume_step or 0)
                    and not json.loads(l).get("final")]
            self.path.write_text("".join(l + "\n" for l in kept))
            self.tb = SummaryWriter(str(stage_dir / "tb"))

    def write(self, rec: dict) -> None:
        if not self.rank0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in rec.items():
            if k not in ("step", "final") and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.rank0:
            self.tb.close()


def to_device(batch) -> tuple:
    return tuple(v.to(device()) for v in batch)


def evaluate(module, val, cfg: LoopConfig) -> float:
    rank, world = dist.get_rank(), dist.get_world_size()
    mb = cfg.train.micro_batch_size
    total, n = 0.0, 0
    module.eval()
    with torch.no_grad():
        for b in range(cfg.train.eval_batches):
            # A fixed slice of the validation set, split over ranks: the same number every eval.
            idx = [(b * world * mb + rank * mb + j) % len(val) for j in range(mb)]
            task, _ = module(to_device(val.batch(idx)))
            total += task.item()
            n += 1
    module.train()
    return all_reduce_mean(total / n)


def train_stage(student_with_ifd: StudentWithIFD, teacher: FrozenTeacher | None, cfg: LoopConfig) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    t = cfg.train
    train_data = cfg.family.dataset(cfg.spec, cfg.data_dir, "train")
    val_data = cfg.family.dataset(cfg.spec, cfg.data_dir, "val")
    ckpt_dir = cfg.stage_dir / "checkpoints"
    preempt = Preemption()

    engine, _, _, _ = deepspeed.initialize(
        model=student_with_ifd, model_parameters=param_groups(student_with_ifd, t.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, cfg.steps)),
        config=cfg.ds_config)

    loop = checkpoint.load(engine, ckpt_dir) if cfg.resume else None
    if loop is None:
        alpha = 0.0
        if teacher is not None and cfg.ifd.enabled:
            if cfg.ifd.alpha == "auto":
                # Each rank its own share of the first steps' data: a multi-rank contrastive loss
                # would see duplicated pairs if every rank used the same batches.
                calib = [to_device(train_data.batch(sample_indices(len(train_data), cfg.seed, 0, m,
                                                                   cfg.ifd.calib_batches, t.micro_batch_size,
                                                                   rank, world)))
                         for m in range(cfg.ifd.calib_batches)]
                alpha = calibrate_alpha(engine.module, teacher, calib, cfg.ifd.ratio, reduce=all_reduce_mean)
            else:
                alpha = float(cfg.ifd.alpha)
        loop = {"step": 0, "alpha": alpha}
        resumed_from = None
    else:
        resumed_from = loop["step"]
    alpha = loop["alpha"]
    log = MetricsLog(cfg.stage_dir, resumed_from)
    tokens_per_step = t.micro_batch_size * t.grad_accum * world * cfg.tokens_per_sample
    start = loop["step"]
    preempted = False
    # A context manager, so the bar is closed before an error line is printed, never after it.
    with tqdm(total=cfg.steps, initial=start, desc=cfg.stage, disable=rank != 0, dynamic_ncols=True) as bar:
        t0 = time.time()
        for step in range(start, cfg.steps):
            task_sum = ifd_sum = 0.0
            for micro in range(t.grad_accum):
                idx = sample_indices(len(train_data), cfg.seed, step, micro, t.grad_accum, t.micro_batch_size, rank, world)
                batch = to_device(train_data.batch(idx, step))  # step: LaCLIP's per-step caption draw
                feats = teacher.features(batch) if (teacher is not None and alpha > 0) else None
                task, ifd = engine(batch, feats, alpha)
                loss = task + ifd
                engine.backward(loss)
                engine.step()
                task_sum += task.item() / t.grad_accum
                ifd_sum += ifd.item() / t.grad_accum
            bad_loss, stop = all_reduce_flags(not math.isfinite(task_sum + ifd_sum), preempt.requested)
            if bad_loss:
                raise CompTError(f"stage {cfg.stage}: loss is not finite at step {step + 1} "
                                 f"(task {task_sum:.4g}, ifd {ifd_sum:.4g}); earlier checkpoints kept")
            done = step + 1
            rec = {"step": done, "tokens": done * tokens_per_step, "macs": done * cfg.macs_per_step,
                   "loss": task_sum + ifd_sum, "task_loss": task_sum, "ifd_loss": ifd_sum,
                   "lr": engine.get_lr()[0], "alpha": alpha}
            if done % t.log_every == 0 or done == 1:
                log.write(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{task_sum:.3f}", ifd=f"{ifd_sum:.3f}")
            if done % t.eval_every == 0 and done < cfg.steps:
                val = evaluate(engine, val_data, cfg)
                log.write({"step": done, "tokens": rec["tokens"], "macs": rec["macs"], "val_loss": val,
                           **cfg.family.evaluate(engine.module.student, cfg.spec, cfg.data_dir, val)})
            if done % t.save_every == 0 or stop:
                checkpoint.save(engine, ckpt_dir, done, {"step": done, "alpha": alpha})
            if stop:
                preempted = True
                break
    if preempted:
        log.close()
        raise SystemExit(EXIT_PREEMPTED)
    final_val = evaluate(engine, val_data, cfg)
    final_metrics = cfg.family.evaluate(engine.module.student, cfg.spec, cfg.data_dir, final_val)
    log.write({"final": True, "step": cfg.steps, "tokens": cfg.steps * tokens_per_step,
               "macs": cfg.steps * cfg.macs_per_step, "val_loss": final_val, **final_metrics})
    log.close()
    if start < cfg.steps:  # a finished run resumed again has nothing new to checkpoint
        checkpoint.save(engine, ckpt_dir, cfg.steps, {"step": cfg.steps, "alpha": alpha})
    probe = probe_outputs(engine, val_data, cfg.family)
    state = checkpoint.gather_student_state(engine)
    return {"final_val_loss": final_val, "eval": final_metrics, "steps": cfg.steps, "tokens": cfg.steps * tokens_per_step,
            "alpha": alpha, "state": state, "probe_logits": probe, "seconds": time.time() - t0}


def probe_outputs(engine, val, family) -> torch.Tensor | None:
    """The trained engine's outputs on a fixed batch, kept so tests can check the export against it."""
    engine.eval()
    with torch.no_grad():
        out = family.probe(engine.module.student, to_device(val.batch([0, 1]))).cpu()
    engine.train()
    return out if dist.get_rank() == 0 else None
