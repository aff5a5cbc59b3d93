"""Public IFD loss: dispatch (the chunked kernel on CUDA, the reference elsewhere), sharded tokens,
autocast.

`impl` (the chain spec's `ifd.kernel`): "triton" is the chunked path of triton_ifd.py (cuBLAS GEMMs per
chunk of tokens and one Triton pass; it needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tests);
"reference" is plain PyTorch (reference.py), the escape hatch; "auto" (or None) is "triton" for CUDA
tensors and "reference" for anything else. On CPU "auto" picks the reference on purpose: the
chunked path's Triton pass only runs on a GPU or in the (slow, numpy) interpreter, and CPU runs
are small enough that the reference's [N, d_t] projection costs nothing worth a second code path.

Gradient convention with `group` (read this before wiring it into a trainer):
  * The returned value is the exact GLOBAL mean over every token of every rank in `group`:
    alpha * sum_r SSE_r / sum_r numel_r, identical on all ranks. One all-reduce of (SSE, numel)
    in forward; nothing is communicated in backward.
  * The gradient each rank produces is its LOCAL contribution to the gradient of that global mean,
    multiplied by world_size(group) when grad_reduce="mean" (the default). Data-parallel engines
    (DDP, DeepSpeed ZeRO 1/2/3) AVERAGE gradients over ranks, so average_r(world * local_r) =
    sum_r local_r = the unsharded gradient. This holds for the weight/bias of T and for everything
    upstream of the student features (they are averaged too). With grad_reduce="sum" the factor is 1
    (for code that sums gradients over ranks). The all-reduce is NOT differentiated: an all-reduce
    in backward would count every rank's contribution world_size times.
  * Sequence parallel inside data parallel (group = the SP group, gradients averaged over DP x SP)
    also comes out right with "mean": the average over DP*SP of SP*local is the mean over replicas
    of each replica's global-mean gradient.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CompTError
from .reference import reference_sse


def _local_sse(student, teacher, weight, bias, impl):
    if impl in (None, "auto"):
        impl = "triton" if student.is_cuda else "reference"
    if impl == "reference":
        return reference_sse(student, teacher, weight, bias)
    if impl == "triton":
        from .triton_ifd import triton_sse  # lazy: importing triton costs time and reads env vars
        return triton_sse(student, teacher, weight, bias)
    raise ValueError(f"fused_ifd_loss: impl must be 'auto' (or None), 'triton' or 'reference', got {impl!r}")


def fused_ifd_loss(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None, alpha: float | torch.Tensor = 1.0,
                   group=None, *, impl: str | None = None, grad_reduce: str = "mean") -> torch.Tensor:
    """alpha * mean((student @ weight.T + bias - teacher)**2) as an fp32 scalar (fp64 for fp64 inputs).

    student [N, d_s], teacher [N, d_t], weight [d_t, d_s], bias [d_t] or None. Differentiable w.r.t.
    student, weight and bias; the teacher is detached. `impl`: "auto" or None (the chunked kernel on
    CUDA tensors, the reference elsewhere), "triton" or "reference" (module docstring). The "triton"
    path computes the gradients in forward (3 GEMMs, one backward only); see triton_ifd._ChunkedSSE.
    `group`: see the module docstring for the exact value and the gradient convention (`grad_reduce`
    "mean" or "sum"). Compute dtype is the student's (after autocast's cast, see below): the weight
    is cast to it for the GEMMs and the projection S W^T is rounded to it, as eager PyTorch does; the
    bias is added, and the teacher compared, in fp32; loss, dW and db accumulate in fp32; gradients
    come back in each input's own dtype.
    """
    if hasattr(weight, "ds_id") and weight.numel() == 0:
        raise RuntimeError("fused_ifd_loss: weight is a ZeRO-3 partition that is not gathered; call it "
                           "through IFDProjection's forward or inside deepspeed.zero.GatheredParameters")
    if student.dim() != 2 or teacher.dim() != 2 or weight.dim() != 2:
        raise ValueError("fused_ifd_loss: expected student [N, d_s], teacher [N, d_t], weight [d_t, d_s]")
    n, d_s = student.shape
    d_t = weight.shape[0]
    if weight.shape[1] != d_s or tuple(teacher.shape) != (n, d_t):
        raise ValueError(f"fused_ifd_loss: shapes student {tuple(student.shape)}, teacher "
                         f"{tuple(teacher.shape)}, weight {tuple(weight.shape)} do not match")
    if bias is not None and tuple(bias.shape) != (d_t,):
        raise ValueError(f"fused_ifd_loss: bias must be [{d_t}], got {tuple(bias.shape)}")
    if grad_reduce not in ("mean", "sum"):
        raise ValueError(f"fused_ifd_loss: grad_reduce must be 'mean' or 'sum', got {grad_reduce!r}")
    teacher = teacher.detach()
    dev = student.device.type
    # Autocast does not see inside a custom autograd Function / Triton launch, so apply its policy
    # here explicitly: run the projection in the autocast dtype, then switch autocast off so that
    # nothing inside re-casts (the reference would otherwise mix dtypes).
    if torch.is_autocast_enabled(dev):
        student = student.to(torch.get_autocast_dtype(dev))
    with torch.autocast(dev, enabled=False):
        sse = _local_sse(student, teacher, weight, bias, impl)
    numel = n * d_t
    if group is None:
        return alpha * sse / numel
    stats = torch.tensor([0.0, float(numel)], dtype=torch.float64, device=sse.device)
    stats[0] = sse.detach().to(torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    total, count = stats[0].to(torch.float32), stats[1].to(torch.float32)
    g = float(dist.get_world_size(group)) if grad_reduce == "mean" else 1.0
    # Value: exactly alpha*total/count (the first term is x - x = 0). Gradient: only through the
    # local sse, scaled by g/count (see module docstring).
    local = sse * g
    return alpha * (local - local.detach()) / count + (alpha * total / count).detach()


class IFDProjection(nn.Module):
    """The learned map T: student features -> teacher features, and the IFD loss through it.

    forward(student_feats [..., d_s], teacher_feats [..., d_t], alpha, group=None) -> fp32 scalar.
    The loss is computed inside this module's forward on purpose: DeepSpeed ZeRO-3's pre-forward
    hook gathers `weight`/`bias` before the kernel reads their storage, and the gradient the kernel
    returns lands in the parameters' AccumulateGrad, where ZeRO's reduce hooks pick it up.

    init="identity" (default): when d_s >= d_t, W = [I_{d_t} | 0] and b = 0, i.e. T picks the first
    d_t student coordinates. Width growth by `insert` places the teacher's features in the student's
    leading block, so IFD starts near 0 instead of at a random projection's large error. Note: an
    "alpha: auto" calibration on the first batches then sees a near-zero L_IFD; clamp alpha there.
    When d_s < d_t, or init="default", nn.Linear's default init is used.
    """

    def __init__(self, d_student: int, d_teacher: int, bias: bool = True, init: str = "identity",
                 impl: str | None = None, grad_reduce: str = "mean"):
        super().__init__()
        if init not in ("identity", "default"):
            raise ValueError(f"IFDProjection: init must be 'identity' or 'default', got {init!r}")
        if impl not in (None, "auto", "triton", "reference"):
            raise ValueError(f"IFDProjection: impl must be 'auto', 'triton' or 'reference', got {impl!r}")
        if impl == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            # Here, not at the first training step: a spec's `ifd.kernel: triton` on a CPU box is one line.
            raise CompTError("ifd.kernel: triton needs a CUDA device (or TRITON_INTERPRET=1); use auto or reference")
        self.d_student, self.d_teacher = d_student, d_teacher
        self.impl, self.grad_reduce = impl, grad_reduce
        # Parameters are created and initialized in this __init__ (no inner nn.Linear): under
        # deepspeed.zero.Init a submodule's parameters are partitioned as soon as ITS __init__
        # returns, and writing the identity into an already partitioned (empty) weight would fail.
        self.weight = nn.Parameter(torch.empty(d_teacher, d_student))
        self.bias = nn.Parameter(torch.empty(d_teacher)) if bias else None
        with torch.no_grad():
            if init == "identity" and d_student >= d_teacher:
                self.weight.zero_()
                self.weight[:, :d_teacher].copy_(torch.eye(d_teacher))
                if self.bias is not None:
                    self.bias.zero_()
            else:  # nn.Linear's default init
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
                if self.bias is not None:
                    bound = 1 / math.sqrt(d_student) if d_student > 0 else 0.0
                    nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, student_feats: torch.Tensor, teacher_feats: torch.Tensor,
                alpha: float | torch.Tensor = 1.0, group=None) -> torch.Tensor:
        s = student_feats.reshape(-1, self.d_student)
        t = teacher_feats.reshape(-1, self.d_teacher)
        return fused_ifd_loss(s, t, self.weight, self.bias, alpha, group, impl=self.impl,
                              grad_reduce=self.grad_reduce)

    def extra_repr(self) -> str:
        return f"d_student={self.d_student}, d_teacher={self.d_teacher}, bias={self.bias is not None}"
