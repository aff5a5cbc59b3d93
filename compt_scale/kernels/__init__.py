"""Fused inverse-feature-distillation (IFD) loss: chunked kernel on CUDA, reference elsewhere.

fused_ifd_loss(student, teacher, weight, bias=None, alpha=1.0, group=None, *, impl=None,
grad_reduce="mean") and IFDProjection (the learned T plus the loss).
See ifd.py for the exact value/gradient convention with a process group.
"""
from .ifd import IFDProjection, fused_ifd_loss
from .reference import reference_sse

__all__ = ["fused_ifd_loss", "IFDProjection", "reference_sse"]
