"""What the loop records: metrics.jsonl + TensorBoard, and the throughput figures (tokens/s, MFU).

MFU follows the project's convention (shared/gpu/README.md): model FLOPs per token
(`family.flops_per_token`: 6 N + 12 n_layers d_model seq for decoders; for CLIP, per image-caption
pair, 2 x 3 x its forward MACs) times tokens per second, over the device's dense bf16 peak times the number of ranks.
Only the student counts (the teacher's forwards are overhead, not model FLOPs). On a CPU or an
unknown device there is no peak, and `mfu` is logged as null.
"""
from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from ..files import atomic_write_text

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), matched against torch.cuda.get_device_name() in
# this order (the PCIe H100 is a slower part than the SXM one the README quotes).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device: torch.device | None = None) -> float | None:
    """The dense bf16 peak of `device` (default: the current CUDA device), None on CPU or unknown GPUs."""
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, world: int = 1) -> float | None:
    """Model FLOPs utilization of `world` devices processing `tokens_per_s` tokens in total."""
    if peak is None or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak * world)


class Throughput:
    """Tokens/s over the steps since the last mark. Call `pause()` after work that is not training
    (eval, checkpoints) so it is left out of the next window. Read only where the host has synced
    with the device anyway (log steps), so it adds no synchronization of its own."""

    def __init__(self, step: int):
        self.step, self.t = step, time.perf_counter()

    def pause(self, step: int) -> None:
        self.step, self.t = step, time.perf_counter()

    def rate(self, step: int, tokens_per_step: int) -> float:
        now = time.perf_counter()
        out = (step - self.step) * tokens_per_step / max(now - self.t, 1e-9)
        self.step, self.t = step, now
        return out


_TB_HOOKED = False


def _quiet_full_disk_in_tensorboard() -> None:
    """TensorBoard writes its event file from a background thread; on a full disk that thread dies
    with a traceback on stderr, while the stage itself reports the full disk in one line (and keeps
    the earlier checkpoints). Only that thread's ENOSPC/EDQUOT is silenced; anything else is shown."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in (errno.ENOSPC, errno.EDQUOT) \
                and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    global _TB_HOOKED
    if not _TB_HOOKED:
        threading.excepthook, _TB_HOOKED = hook, True


class MetricsLog:
    """metrics.jsonl + TensorBoard, written by rank 0 only. Each line written also refreshes the
    stage lock's heartbeat (handed in by the stage: chain/lock.py), so another host sees the stage
    is alive."""

    def __init__(self, stage_dir: Path, resume_step: int | None, heartbeat: Callable[[], None] = lambda: None):
        self.rank0, self.heartbeat = dist.get_rank() == 0, heartbeat
        self.path = stage_dir / "metrics.jsonl"
        if self.rank0:
            lines = self.path.read_text().splitlines() if (resume_step is not None and self.path.is_file()) else []
            # On resume, drop what was logged after the checkpoint (it is about to be redone) and a
            # line torn by the kill.
            recs = [r for r in map(_parse_line, lines) if r is not None]
            kept = [r for r in recs if r.get("step", 0) <= (resume_step or 0) and not r.get("final")]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            _quiet_full_disk_in_tensorboard()
            self.tb = SummaryWriter(str(stage_dir / "tb"))

    def write(self, rec: dict) -> None:
        if not self.rank0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.heartbeat()
        for k, v in rec.items():
            if k not in ("step", "final") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.rank0:
            try:
                self.tb.close()
            except OSError as e:   # a full disk: the stage reports it (and what it kept) in one line
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise


def _parse_line(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


class StepLosses:
    """The step's task/IFD losses, summed on the device (no host sync per micro-batch), and the first
    step whose loss was not finite, also remembered on the device: a check any number of steps later
    (`sync`, at log/eval/save steps and the last step) still names the exact step, and since every
    checkpoint is written right after a check, no checkpoint ever holds a non-finite step."""

    def __init__(self, device: torch.device, grad_accum: int):
        self.device, self.grad_accum = device, grad_accum
        self.task, self.ifd, self.bad_step, self.bad_task, self.bad_ifd = (
            torch.zeros((), dtype=torch.float64, device=device) for _ in range(5))

    def start_step(self) -> None:
        self.task.zero_()
        self.ifd.zero_()

    def add(self, task: torch.Tensor, ifd: torch.Tensor) -> None:
        self.task += task.detach().double() / self.grad_accum
        self.ifd += ifd.detach().double() / self.grad_accum

    def end_step(self, step: int) -> None:
        new = ~torch.isfinite(self.task + self.ifd) & (self.bad_step == 0)
        self.bad_step = torch.where(new, float(step), self.bad_step)
        self.bad_task = torch.where(new, self.task, self.bad_task)
        self.bad_ifd = torch.where(new, self.ifd, self.bad_ifd)

    def sync(self, preempt: bool) -> dict:
        """Two small all-reduces and one read-back: the earliest non-finite step on any rank (or None),
        whether any rank was asked to stop, the step's losses averaged over ranks (the loss of the
        whole global batch, comparable across world sizes), and this rank's first non-finite losses."""
        flags = torch.stack([torch.where(self.bad_step > 0, self.bad_step, float("inf")),
                             torch.full((), -float(preempt), dtype=torch.float64, device=self.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        losses = torch.stack([self.task, self.ifd])
        dist.all_reduce(losses)
        losses /= dist.get_world_size()
        bad, stop, task, ifd, bad_task, bad_ifd = torch.cat(
            [flags, losses, torch.stack([self.bad_task, self.bad_ifd])]).tolist()
        return {"bad_step": None if bad == float("inf") else int(bad), "stop": stop < 0,
                "task": task, "ifd": ifd, "bad_task": bad_task, "bad_ifd": bad_ifd}
