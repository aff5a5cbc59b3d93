"""Reference (plain PyTorch) local sum of squared errors of the IFD term.

Used on CPU and as the test oracle. It materializes the [N, d_t] projection, which is fine where it
runs (CPU, small tests); the Triton path exists precisely to avoid that on the GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_sse(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """sum((student @ weight.T + bias - teacher)**2) over all elements, accumulated in >= fp32.

    The projection S W^T is computed in the student's dtype (what eager bf16 training does); the bias,
    the error and the sum in fp32 (fp64 when the inputs are fp64, which is how the tests build their oracle).
    """
    dt = student.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    y = F.linear(student, weight.to(dt)).to(acc)
    if bias is not None:  # in fp32, like the Triton epilogue
        y = y + bias.to(acc)
    d = y - teacher.to(acc)
    return (d * d).sum()
