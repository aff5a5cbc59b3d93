"""The CoM-PT objective: L = L_task + alpha * ||F_teacher - T(F_student)||^2.

`StudentWithIFD` is the module DeepSpeed wraps: the student and the projection T (dropped at export).
The teacher stays outside the student's engine: frozen, eval mode, no grads, never optimized.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import CompTError


class StudentWithIFD(nn.Module):
    """The student plus one projection T per feature stream (decoders: the final hidden state; CLIP:
    image and text embeddings). L_IFD is the mean over streams, as the paper averages CLIP's two."""

    def __init__(self, family, student: nn.Module, ifd_heads: list[nn.Module] | None):
        super().__init__()
        self.family = family
        self.student = student
        self.ifd = nn.ModuleList(ifd_heads) if ifd_heads else None

    def forward(self, batch, teacher_features=None, alpha: float = 0.0):
        task, features = self.family.losses(self.student, batch)
        if self.ifd is None or teacher_features is None:
            return task, torch.zeros((), device=task.device)
        # Each T runs inside its own module's forward so ZeRO-3 gathers its weight for the kernel.
        terms = [head(f_s, f_t, alpha=alpha) for head, f_s, f_t in zip(self.ifd, features, teacher_features)]
        return task, sum(terms) / len(terms)


class FrozenTeacher:
    """The predecessor's export, used only for its features: replicated, or (partitioned=True) a
    ZeRO-3 inference module already placed by DeepSpeed (chain/weights.py load_teacher)."""

    def __init__(self, family, model: nn.Module, dtype: torch.dtype, device: torch.device,
                 partitioned: bool = False):
        self.family = family
        self.model = model.eval() if partitioned else model.to(device=device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config = family.config_of(model)
        self._features = family.features

    def compile(self) -> None:
        """torch.compile the feature forward (train.compile)."""
        self._features = torch.compile(self.family.features)

    @torch.no_grad()
    def features(self, batch) -> list[torch.Tensor]:
        return self._features(self.model, batch)


def calibrate_alpha(module: StudentWithIFD, teacher: FrozenTeacher, batches, ratio: float,
                    reduce=lambda x: x) -> float:
    """alpha so that alpha * L_ifd ~= ratio * L_task on the first batches (paper: ratio 0.1).

    Computed on the grown student before any update, each rank on its own share of the first batches;
    `reduce` averages the sums over ranks, so every rank gets the same alpha.
    """
    task_sum, ifd_sum = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            task, ifd = module(batch, teacher.features(batch), alpha=1.0)
            task_sum += float(task)
            ifd_sum += float(ifd)
    task_sum, ifd_sum = reduce(task_sum), reduce(ifd_sum)
    if not math.isfinite(task_sum) or not math.isfinite(ifd_sum):
        raise CompTError("ifd.alpha: calibration saw a non-finite loss (check the teacher export)")
    if ifd_sum <= 1e-12:
        # The projection already reproduces the teacher (e.g. function-preserving growth): any alpha
        # gives ~0 now; use the ratio itself so the term still acts once the student drifts.
        return ratio
    return ratio * task_sum / ifd_sum
