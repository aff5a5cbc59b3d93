"""The IFD head of CLIP's `ifd.normalize: before` (plain torch: the fused kernel has no normalization)."""
from __future__ import annotations

import math

import torch
from torch import nn


class UnitIFDProjection(nn.Module):
    """`ifd.normalize: before` for CLIP: L_IFD = alpha * mean((normalize(T s) - t)^2), T linear without
    bias, s and t the L2-normalized embeddings CLIP.forward returns. Without a bias normalize(T s) is
    the same for s and any positive multiple of s, so this equals T applied to the raw embedding
    before normalization, as the official code does (its T has a bias; ours drops it for this
    identity). Plain torch (the fused kernel has no normalization); weight created here, not in an
    inner nn.Linear, so ZeRO-3 gathers it for this module's forward. Init as IFDProjection: identity
    on the leading block when d_s >= d_t (insert growth places the teacher's features there)."""

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__()
        self.d_student, self.d_teacher = d_student, d_teacher
        self.weight = nn.Parameter(torch.empty(d_teacher, d_student))
        with torch.no_grad():
            if d_student >= d_teacher:
                self.weight.zero_()
                self.weight[:, :d_teacher].copy_(torch.eye(d_teacher))
            else:
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, student_feats, teacher_feats, alpha: float = 1.0, group=None):
        y = torch.nn.functional.normalize(student_feats.reshape(-1, self.d_student) @ self.weight.t().to(
            student_feats.dtype), dim=-1).float()
        return alpha * ((y - teacher_feats.reshape(-1, self.d_teacher).float()) ** 2).mean()
