"""The CoM-PT objective: L = L_task + alpha * ||F_teacher - T(F_student)||^2.

`StudentWithIFD` is the module DeepSpeed wraps: the student and the projection T (dropped at export).
The teacher stays outside the engine: frozen, eval mode, no grads, never partitioned or optimized.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import CompTError
from ..families import hf_decoder


class StudentWithIFD(nn.Module):
    def __init__(self, student: nn.Module, ifd_head: nn.Module | None):
        super().__init__()
        self.student = student
        self.ifd = ifd_head

    def forward(self, input_ids, labels, teacher_hidden=None, alpha: float = 0.0):
        task, hidden = hf_decoder.forward_features(self.student, input_ids, labels)
        if self.ifd is None or teacher_hidden is None:
            return task, torch.zeros((), device=task.device)
        # T runs inside the IFD head's own forward so ZeRO-3 gathers its weight for the kernel.
        ifd = self.ifd(hidden, teacher_hidden, alpha=alpha)
        return task, ifd


class FrozenTeacher:
    """The predecessor's export, used only for its features."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.model = model.to(device=device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config = model.config

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1]


def calibrate_alpha(module: StudentWithIFD, teacher: FrozenTeacher, batches, ratio: float) -> float:
    """alpha so that alpha * L_ifd ~= ratio * L_task on the first batches (paper: ratio 0.1).

    Computed on the grown student before any update; every rank sees the same batches (the caller
    passes rank-independent ones), so all ranks agree on alpha without communication.
    """
    task_sum, ifd_sum = 0.0, 0.0
    with torch.no_grad():
        for input_ids, labels in batches:
            task, ifd = module(input_ids, labels, teacher.features(input_ids), alpha=1.0)
            task_sum += float(task)
            ifd_sum += float(ifd)
    if not math.isfinite(task_sum) or not math.isfinite(ifd_sum):
        raise CompTError("ifd.alpha: calibration saw a non-finite loss (check the teacher export)")
    if ifd_sum <= 1e-12:
        # The projection already reproduces the teacher (e.g. function-preserving growth): any alpha
        # gives ~0 now; use the ratio itself so the term still acts once the student drifts.
        return ratio
    return ratio * task_sum / ifd_sum
