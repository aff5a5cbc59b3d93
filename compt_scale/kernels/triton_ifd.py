"""Host side of the Triton IFD path: block configs, chunking, and the autograd Function.

Forward: one GEMM over all tokens; the epilogue turns each [BLOCK_M, BLOCK_N] tile of Y = S W^T + b
into its sum of squared errors, so Y never exists in memory (only one fp32 partial per tile).
Backward: tokens in chunks of `rows` rows; per chunk the same GEMM recomputes Y tile by tile and
stores dY = 2*g*(Y - T) into a [rows, d_t] chunk buffer (compute dtype), then dS_chunk = dY W and
dW += dY^T S_chunk (fp32 accumulator), db += column sums (fp32). Besides the gradients themselves,
the extra memory is the chunk buffer (<= CHUNK_BYTES), the fp32 dW and small partials: independent
of N. triton_mode="precompute" runs that same chunked pass in forward instead (see _TritonSSE).
"""
from __future__ import annotations

import os

import torch
import triton

from .triton_kernels import _matmul_kernel, _proj_err_kernel, _scale_kernel

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


def _proj_err(s, w, b, t, cfg, prec, out=None, db_part=None, sse_part=None, gscale=None):
    """Launch the projection+error kernel; None outputs are not written (constexpr-disabled)."""
    m, k = s.shape
    n = w.shape[0]
    dummy = sse_part if sse_part is not None else db_part  # pointer for the unused slots
    so = (out.stride(0), out.stride(1)) if out is not None else (0, 0)
    _proj_err_kernel[_grid(m, n, cfg)](
        s, w, b if b is not None else w, t, out if out is not None else dummy,
        db_part if db_part is not None else dummy, sse_part if sse_part is not None else dummy,
        gscale if gscale is not None else dummy,
        m, n, k, s.stride(0), s.stride(1), w.stride(0), w.stride(1), t.stride(0), t.stride(1), *so,
        HAS_BIAS=b is not None, WRITE_SSE=sse_part is not None, WRITE_GRAD=out is not None,
        INPUT_PRECISION=prec, **_launch_opts(cfg))


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


def _grad_pass(s, t, w, b, gscale, need_s, need_w, need_b, want_sse, cfg, prec):
    """Chunked pass over the tokens: recompute Y per chunk, dY = 2*g*(Y - T) into the chunk buffer,
    dS = dY W, dW += dY^T S (fp32), db += colsum(dY) (fp32); optionally the SSE in the same pass.

    Every returned buffer is freshly allocated and not kept by us: Triton stores do not bump
    version counters, so handing autograd a cached workspace that we later overwrite would corrupt
    gradients silently.
    """
    m, k = s.shape
    n = w.shape[0]
    dev = s.device
    ds = torch.empty(m, k, dtype=s.dtype, device=dev) if need_s else None
    dw = torch.zeros(n, k, dtype=torch.float32, device=dev) if need_w else None
    db = torch.zeros(n, dtype=torch.float32, device=dev) if need_b else None
    sse = torch.zeros((), dtype=torch.float64, device=dev) if want_sse else None
    if m == 0 or n == 0:
        if ds is not None:
            ds.zero_()
        return ds, dw, db, sse
    rows = _chunk_rows(m, n, s.element_size(), cfg["BLOCK_M"])
    buf = torch.empty(rows, n, dtype=s.dtype, device=dev)
    for m0 in range(0, m, rows):
        mc = min(rows, m - m0)
        sc, tc, dy = s[m0:m0 + mc], t[m0:m0 + mc], buf[:mc]
        num_m = triton.cdiv(mc, cfg["BLOCK_M"])
        dbp = torch.empty(num_m, n, dtype=torch.float32, device=dev)
        ssep = torch.empty(_grid(mc, n, cfg)[0], dtype=torch.float32, device=dev) if want_sse else None
        _proj_err(sc, w, b, tc, cfg, prec, out=dy, db_part=dbp, sse_part=ssep, gscale=gscale)
        if db is not None:
            db += dbp.sum(0)                                       # fixed-order reduction
        if sse is not None:
            sse += ssep.sum(dtype=torch.float64)
        if ds is not None:
            _matmul(dy, w, ds[m0:m0 + mc], False, cfg, prec)       # dS = dY W
        if dw is not None:
            _matmul(dy.t(), sc, dw, True, cfg, prec)               # dW += dY^T S
    return ds, dw, db, sse


def _scale_(x, g, cfg):
    """In place x *= g (g a 1-element fp32 device tensor), in fp32, without a host sync."""
    if x.numel():
        _scale_kernel[(triton.cdiv(x.numel(), 1024),)](x, g, x.numel(), INTERP_BF16=cfg["INTERP_BF16"],
                                                       BLOCK=1024)


class _TritonSSE(torch.autograd.Function):
    """sum((S W^T + b - T)^2), fp32 scalar; gradients for S, W, b (never T).

    mode "recompute" (default): forward is one GEMM with the SSE in its epilogue, backward
    recomputes Y chunk by chunk (4 GEMMs in all). mode "precompute": when any input needs a
    gradient, forward already runs the gradient pass with g = 1 (3 GEMMs in all, no recompute)
    and keeps dS/dW/db until backward, which only scales them by the incoming gradient. dS is
    allocated in forward rather than backward; the IFD loss is the last node of the graph, so both
    allocate it while the model's activations are live.
    """

    @staticmethod
    def forward(ctx, s, t, w, b, mode):
        n = w.shape[0]
        cfg, prec = _config(s.dtype), _input_precision(s.dtype)
        ctx.mode, ctx.cfg, ctx.prec = mode, cfg, prec
        need = ctx.needs_input_grad
        if mode == "precompute" and any(need):
            ones = torch.ones(1, dtype=torch.float32, device=s.device)
            ds, dw, db, sse = _grad_pass(s, t, w, b, ones, need[0], need[2],
                                         need[3] and b is not None, True, cfg, prec)
            ctx.grads = (ds, dw, db)
            ctx.dtypes = (w.dtype, b.dtype if b is not None else None)
            return sse.to(torch.float32)
        ctx.save_for_backward(s, t, w, b)
        if s.shape[0] == 0 or n == 0:
            return torch.zeros((), dtype=torch.float32, device=s.device)
        part = torch.empty(_grid(s.shape[0], n, cfg)[0], dtype=torch.float32, device=s.device)
        _proj_err(s, w, b, t, cfg, prec, sse_part=part)
        # One partial per tile, summed by PyTorch's (deterministic) reduction in fp64.
        return part.sum(dtype=torch.float64).to(torch.float32)

    @staticmethod
    def backward(ctx, g):
        gscale = g.detach().reshape(1).to(torch.float32).contiguous()
        if ctx.mode == "precompute":
            if ctx.grads is None:
                raise RuntimeError("fused_ifd_loss(mode='precompute') supports one backward only "
                                   "(retain_graph reuse would rescale its stored gradients)")
            ds, dw, db = ctx.grads
            ctx.grads = None  # handed to autograd below and never touched by us again
            if ds is not None:
                _scale_(ds, gscale, ctx.cfg)
            if dw is not None:
                dw = dw.mul_(gscale).to(ctx.dtypes[0])
            if db is not None:
                db = db.mul_(gscale).to(ctx.dtypes[1])
            return ds, None, dw, db, None
        s, t, w, b = ctx.saved_tensors
        need_s, _, need_w, need_b = ctx.needs_input_grad[:4]
        ds, dw, db, _ = _grad_pass(s, t, w, b, gscale, need_s, need_w, need_b and b is not None,
                                   False, ctx.cfg, ctx.prec)
        dw = dw.to(w.dtype) if dw is not None else None
        db = db.to(b.dtype) if db is not None else None
        return ds, None, dw, db, None


def triton_sse(student, teacher, weight, bias, mode="recompute"):
    if not student.is_cuda and not _interpreting():
        raise RuntimeError("fused_ifd_loss(impl='triton') needs CUDA tensors (or TRITON_INTERPRET=1 "
                           "set before triton is imported, for CPU testing)")
    if student.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fused_ifd_loss(impl='triton'): unsupported dtype {student.dtype}")
    if mode not in ("recompute", "precompute"):
        raise ValueError(f"fused_ifd_loss: triton_mode must be 'recompute' or 'precompute', "
                         f"got {mode!r}")
    return _TritonSSE.apply(student, teacher, weight, bias, mode)
