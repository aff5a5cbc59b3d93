"""One optimizer step of a stage: the body `train_stage` runs and benchmarks/profile_step.py profiles.

Nothing here reads a value back from the device: losses are summed on the device (StepLosses), the
teacher's features and alpha are passed along as they are, and the host decides (finite loss,
preemption, logging) only at log/eval/save steps in loop.py. The `record_function` ranges name the
parts of the step for torch.profiler (teacher / student forward / backward / optimizer; the IFD term
is its own range inside the student's forward, objective.StudentWithIFD).
"""
from __future__ import annotations

from torch.profiler import record_function

# The profiler ranges, as benchmarks/profile_step.py reads them back.
RANGES = ("teacher", "student_forward", "ifd", "backward", "optimizer")


def train_step(engine, teacher, batches, alpha: float, losses, grad_accum: int, use_teacher: bool) -> None:
    """`grad_accum` micro-batches from `batches` (an iterator of (epoch, index, batch)) through the
    engine: teacher features (when `use_teacher`), task + alpha * IFD, backward, step; the losses are
    added to `losses` (metrics.StepLosses) on the device. DeepSpeed steps the optimizer at the last
    micro-batch (its own accumulation boundary)."""
    for _ in range(grad_accum):
        _, _, batch = next(batches)
        feats = None
        if use_teacher:
            with record_function("teacher"):
                feats = teacher.features(batch)
        with record_function("student_forward"):
            task, ifd = engine(batch, feats, alpha)
        with record_function("backward"):
            engine.backward(task + ifd)
        with record_function("optimizer"):
            engine.step()
        losses.add(task, ifd)
