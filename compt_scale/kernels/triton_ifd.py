"""Host side of the Triton IFD path: block configs, chunking, and the autograd Function.

Forward: one GEMM over all tokens; the epilogue turns each [BLOCK_M, BLOCK_N] tile of Y = S W^T + b
into its sum of squared errors, so Y never exists in memory (only one fp32 partial per tile).
Backward: tokens in chunks of `rows` rows; per chunk the same GEMM recomputes Y tile by tile and
stores dY = 2*g*(Y - T) into a [rows, d_t] chunk buffer (compute dtype), then dS_chunk = dY W and
dW += dY^T S_chunk (fp32 accumulator), db += column sums (fp32). Peak extra memory is the chunk
buffer plus the fp32 dW, independent of N.
"""
from __future__ import annotations

import os

import torch
import triton

from .triton_kernels import _matmul_kernel, _proj_err_kernel

# Test hooks: force small blocks / chunks so the interpreter exercises masks and several chunks.
BLOCK_OVERRIDE: dict | None = None
CHUNK_ROWS_OVERRIDE: int | None = None
CHUNK_BYTES = 64 << 20  # dY chunk buffer budget on the GPU


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(dtype: torch.dtype) -> dict:
    cfg = _block_config(dtype)
    # See triton_kernels.py: works around the interpreter's bf16 dot and bf16 cast only.
    cfg["INTERP_BF16"] = _interpreting() and dtype == torch.bfloat16
    return cfg


def _block_config(dtype: torch.dtype) -> dict:
    if BLOCK_OVERRIDE is not None:
        return dict(BLOCK_OVERRIDE)
    if _interpreting():
        # numpy interpreter: one Python iteration per program, so fewer/bigger tiles are faster.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _input_precision(dtype: torch.dtype) -> str:
    # Match eager fp32 matmul: TF32 only when PyTorch allows it. Ignored for 16-bit inputs.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _grid(m, n, cfg):
    return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)


def _launch_opts(cfg):
    return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages",
                                "INTERP_BF16")}


def _proj_err(s, w, b, t, out, part, gscale, write_grad, cfg, prec):
    m, k = s.shape
    n = w.shape[0]
    if out is None:
        out_arg, so = part, (0, 0)
    else:
        out_arg, so = out, (out.stride(0), out.stride(1))
    _proj_err_kernel[_grid(m, n, cfg)](
        s, w, b if b is not None else w, t, out_arg, part, gscale if gscale is not None else part,
        m, n, k, s.stride(0), s.stride(1), w.stride(0), w.stride(1), t.stride(0), t.stride(1), *so,
        HAS_BIAS=b is not None, WRITE_GRAD=write_grad, INPUT_PRECISION=prec, **_launch_opts(cfg))


def _matmul(a, b, c, accumulate, cfg, prec):
    """c (+)= a @ b for 2-D strided views."""
    m, k = a.shape
    n = b.shape[1]
    _matmul_kernel[_grid(m, n, cfg)](
        a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, INPUT_PRECISION=prec, **_launch_opts(cfg))


def _chunk_rows(m: int, n: int, elt: int, block_m: int) -> int:
    if CHUNK_ROWS_OVERRIDE is not None:
        rows = CHUNK_ROWS_OVERRIDE
    else:
        rows = max(block_m, (CHUNK_BYTES // max(1, n * elt)) // block_m * block_m)
    return max(1, min(rows, m))


class _TritonSSE(torch.autograd.Function):
    """sum((S W^T + b - T)^2), fp32 scalar; gradients for S, W, b (never T)."""

    @staticmethod
    def forward(ctx, s, t, w, b):
        m, _ = s.shape
        n = w.shape[0]
        cfg, prec = _config(s.dtype), _input_precision(s.dtype)
        ctx.save_for_backward(s, t, w, b)
        if m == 0 or n == 0:
            return torch.zeros((), dtype=torch.float32, device=s.device)
        part = torch.empty(_grid(m, n, cfg)[0], dtype=torch.float32, device=s.device)
        _proj_err(s, w, b, t, None, part, None, False, cfg, prec)
        # One partial per tile, summed by PyTorch's (deterministic) reduction in fp64.
        return part.sum(dtype=torch.float64).to(torch.float32)

    @staticmethod
    def backward(ctx, g):
        s, t, w, b = ctx.saved_tensors
        need_s, _, need_w, need_b = ctx.needs_input_grad[:4]
        m, k = s.shape
        n = w.shape[0]
        cfg, prec = _config(s.dtype), _input_precision(s.dtype)
        dev = s.device
        # Every returned buffer is freshly allocated here and never touched again by us: Triton
        # stores do not bump version counters, so reusing a cached workspace that autograd already
        # holds would corrupt gradients silently.
        ds = torch.empty_like(s, memory_format=torch.contiguous_format) if need_s else None
        dw = torch.zeros(n, k, dtype=torch.float32, device=dev) if need_w else None
        db = torch.zeros(n, dtype=torch.float32, device=dev) if (need_b and b is not None) else None
        if m > 0 and n > 0:
            gscale = g.detach().reshape(1).to(torch.float32).contiguous()
            rows = _chunk_rows(m, n, s.element_size(), cfg["BLOCK_M"])
            buf = torch.empty(rows, n, dtype=s.dtype, device=dev)
            for m0 in range(0, m, rows):
                mc = min(rows, m - m0)
                sc, tc, dy = s[m0:m0 + mc], t[m0:m0 + mc], buf[:mc]
                part = torch.empty(triton.cdiv(mc, cfg["BLOCK_M"]), n, dtype=torch.float32, device=dev)
                _proj_err(sc, w, b, tc, dy, part, gscale, True, cfg, prec)
                if db is not None:
                    db += part.sum(0)
                if ds is not None:
                    _matmul(dy, w, ds[m0:m0 + mc], False, cfg, prec)          # dS = dY W
                if dw is not None:
                    _matmul(dy.t(), sc, dw, True, cfg, prec)                  # dW += dY^T S
        elif ds is not None:
            ds.zero_()
        dw = dw.to(w.dtype) if dw is not None else None
        db = db.to(b.dtype) if db is not None else None
        return ds, None, dw, db


def triton_sse(student, teacher, weight, bias):
    if not student.is_cuda and not _interpreting():
        raise RuntimeError("fused_ifd_loss(impl='triton') needs CUDA tensors (or TRITON_INTERPRET=1 "
                           "set before triton is imported, for CPU testing)")
    if student.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fused_ifd_loss(impl='triton'): unsupported dtype {student.dtype}")
    return _TritonSSE.apply(student, teacher, weight, bias)
