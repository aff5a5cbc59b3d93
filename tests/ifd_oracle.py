"""The float64 oracle of the fused IFD loss, shared by the Triton-interpreter tests (CPU) and the
CUDA tests: value and gradients of alpha * mean((s W^T + b - t)^2) in float64."""
from __future__ import annotations

import torch.nn.functional as F


def oracle(s, t, w, b, alpha):
    """fp64 value and grads under the defined semantics (compt_scale/kernels/reference.py): W is
    rounded to the compute dtype (s.dtype) first, and so is the projection s W^T, as eager PyTorch
    rounds a 16-bit matmul's output; the bias, the error and the sums are exact. The rounding is
    straight-through for the gradients (d/dY of the rounded Y is taken as 1)."""
    s64 = s.double().requires_grad_()
    w64 = w.to(s.dtype).double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    y = F.linear(s64, w64)
    y = y + (y.to(s.dtype).double() - y).detach()
    if b64 is not None:
        y = y + b64
    loss = alpha * F.mse_loss(y, t.double())
    loss.backward()
    return loss.detach(), s64.grad, w64.grad, (b64.grad if b is not None else None)


def rel(x, ref):
    """Largest absolute error relative to the reference's largest magnitude."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
