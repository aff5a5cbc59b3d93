"""The float64 oracle of the fused IFD loss, shared by the Triton-interpreter tests (CPU) and the
CUDA tests: value and gradients of alpha * mean((s W^T + b - t)^2) in float64."""
from __future__ import annotations

import torch.nn.functional as F


def oracle(s, t, w, b, alpha):
    """fp64 value and grads; w rounded to the compute dtype first, b not (the defined semantics)."""
    s64 = s.double().requires_grad_()
    w64 = w.to(s.dtype).double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    loss = alpha * F.mse_loss(F.linear(s64, w64, b64), t.double())
    loss.backward()
    return loss.detach(), s64.grad, w64.grad, (b64.grad if b is not None else None)


def rel(x, ref):
    """Largest absolute error relative to the reference's largest magnitude."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
