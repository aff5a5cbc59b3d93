"""Host side of the fused IFD path: token chunks, cuBLAS GEMMs, one Triton pass, autograd Function.

The pattern of liger-kernel's fused linear cross-entropy, applied to the IFD term
sum((S W^T + b - T)^2). Forward walks the tokens in chunks; per chunk:
  Y_c   = S_c W^T                    cuBLAS, compute dtype, into a reused chunk buffer
  pass  : E = Y_c + b - T_c           one Triton pass (triton_kernels._ifd_epilogue_kernel): SSE
          dY_c = 2E over Y_c in place partials, and db's column sums, from a single read of Y_c
  dS_c  = dY_c W                     cuBLAS, written straight into the rows of dS
  dW   += dY_c^T S_c                 cuBLAS, accumulated in fp32
so both gradients are ready when forward returns (3 GEMMs in all, none recomputed), and backward
only scales them by its incoming gradient. The [N, d_t] projection never exists: besides the
gradients themselves, the extra memory is one chunk buffer, the fp32 dW accumulator (when W is not
fp32 itself) and [ROW_GROUPS, d_t] partials.
"""
from __future__ import annotations

import os

import torch
import triton

from .triton_kernels import _ifd_epilogue_kernel, _scale_kernel

# Chunk size. A chunk holds at most CHUNK_BYTES of Y (compute dtype) and at most 1/MIN_CHUNKS of the
# tokens. Why these two numbers: the memory target is 1/4 of eager PyTorch's extra memory
# (gradients excluded) at every benchmark shape; eager holds about 3-10 bytes per element of the
# [N, d_t] projection (the previous kernel's H200 run), so a chunk of at most 1/8 of the rows keeps
# us well under at small N (8K tokens), and 16 MiB caps it at large N (64K tokens x 2048: 4096 rows,
# an estimated 48 MiB with the fp32 dW, against ~97 MiB allowed). Smaller chunks cost time, not
# memory: each chunk re-reads and re-writes the fp32 dW (8 bytes x d_t x d_s) in its dW GEMM, which at
# 4096 rows x 2048 x 4096 is an estimated 1/5 of that GEMM's own time and grows as chunks shrink.
# Estimates, not GPU measurements: benchmarks/ifd_kernel.py --chunk-mib measures other sizes side by
# side. Module constants so that tests (many chunks on tiny inputs) and the benchmark can set them.
CHUNK_BYTES = 16 << 20
MIN_CHUNKS = 8
# Rows of a chunk are a multiple of this (16-byte aligned row slices for cuBLAS, any 16-bit dtype).
ROW_ALIGN = 8
# Row groups of the Triton pass: its grid is ROW_GROUPS x cdiv(d_t, BLOCK_N) programs per chunk
# (>= 256 at d_t 512, enough to fill 132 SMs for a memory-bound pass) and db's partials are
# [ROW_GROUPS, d_t] fp32, summed once at the end.
ROW_GROUPS = 64
# Triton pass tiles; the interpreter (one Python iteration per program) prefers few big tiles.
PASS_CONFIG = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4)
PASS_CONFIG_INTERP = dict(BLOCK_M=16, BLOCK_N=32, num_warps=1)
ROW_GROUPS_INTERP = 4
# dW += dY^T S with 16-bit operands and an fp32 accumulator: one cuBLAS call where torch has
# addmm(out_dtype=...) (CUDA); elsewhere (CPU, interpreter tests) the chunk's dW is a separate GEMM
# added in fp32.
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def chunk_rows(n_tokens: int, d_t: int, elt: int) -> int:
    """Tokens per chunk (see CHUNK_BYTES)."""
    rows = min(CHUNK_BYTES // max(1, d_t * elt), triton.cdiv(n_tokens, MIN_CHUNKS))
    if rows >= n_tokens:
        return max(1, n_tokens)
    return min(max(ROW_ALIGN, rows // ROW_ALIGN * ROW_ALIGN), n_tokens)


def _accumulate_dw(dw: torch.Tensor, dy: torch.Tensor, s_chunk: torch.Tensor) -> None:
    """dw (fp32) += dy^T @ s_chunk, fp32 accumulation whatever the operands' dtype."""
    if dy.dtype == dw.dtype:
        dw.addmm_(dy.t(), s_chunk)
    elif dw.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(dw, dy.t(), s_chunk, out_dtype=torch.float32, out=dw)
    else:
        dw += torch.mm(dy.t(), s_chunk)


def _pass_launch(y, t, b, sse_slots, db_slots, want_grad):
    """The Triton pass over one chunk (y is the chunk's contiguous [rows, d_t] buffer)."""
    m, n = y.shape
    interp = interpreting()
    cfg = PASS_CONFIG_INTERP if interp else PASS_CONFIG
    groups = sse_slots.shape[0]
    rows_per_program = triton.cdiv(triton.cdiv(m, groups), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    grid = (triton.cdiv(m, rows_per_program), triton.cdiv(n, cfg["BLOCK_N"]))
    _ifd_epilogue_kernel[grid](
        y, t, b if b is not None else y, sse_slots, db_slots if db_slots is not None else sse_slots,
        m, n, rows_per_program, y.stride(0), t.stride(0), t.stride(1),
        HAS_BIAS=b is not None, WANT_GRAD=want_grad, INTERP_BF16=interp and y.dtype == torch.bfloat16,
        **cfg)


def chunked_sse_and_grads(s, t, w, b, need_s: bool, need_w: bool, need_b: bool):
    """(sse fp32 scalar, dS or None, dW fp32 or None, db fp32 or None) of sum((S W^T + b - T)^2),
    gradients at an incoming gradient of 1.

    Every returned tensor is freshly allocated and never touched again by us: Triton stores do not
    bump version counters, so handing autograd a workspace we later overwrite would corrupt it silently.
    """
    m, k = s.shape
    n = w.shape[0]
    dev, dt = s.device, s.dtype
    want_grad = need_s or need_w or need_b
    ds = torch.empty(m, k, dtype=dt, device=dev) if need_s else None
    dw = torch.zeros(n, k, dtype=torch.float32, device=dev) if need_w else None
    groups = ROW_GROUPS_INTERP if interpreting() else ROW_GROUPS
    cfg = PASS_CONFIG_INTERP if interpreting() else PASS_CONFIG
    sse_slots = torch.zeros(groups, triton.cdiv(max(n, 1), cfg["BLOCK_N"]), dtype=torch.float64, device=dev)
    db_slots = torch.zeros(groups, n, dtype=torch.float32, device=dev) if want_grad else None
    if m == 0 or n == 0:
        if ds is not None:
            ds.zero_()
        return (sse_slots.sum().float(), ds, dw, db_slots.sum(0) if need_b and db_slots is not None else None)
    w_c = w.to(dt)  # the GEMMs run in the compute dtype (the weight may be an fp32 master copy)
    rows = chunk_rows(m, n, s.element_size())
    buf = torch.empty(rows, n, dtype=dt, device=dev)
    for m0 in range(0, m, rows):
        mc = min(rows, m - m0)
        s_c, y = s[m0:m0 + mc], buf[:mc]
        torch.mm(s_c, w_c.t(), out=y)
        _pass_launch(y, t[m0:m0 + mc], b, sse_slots, db_slots, want_grad)
        if ds is not None:
            torch.mm(y, w_c, out=ds[m0:m0 + mc])
        if need_w:
            _accumulate_dw(dw, y, s_c)
    db = db_slots.sum(0) if need_b and db_slots is not None else None  # fixed-order reduction of the fp32 slots
    return sse_slots.sum().to(torch.float32), ds, dw, db


def _scale_(x: torch.Tensor, g: torch.Tensor) -> None:
    """In place x *= g (g a 1-element fp32 device tensor), in fp32, without a host sync."""
    if x.numel():
        interp_bf16 = interpreting() and x.dtype == torch.bfloat16
        _scale_kernel[(triton.cdiv(x.numel(), 1024),)](x, g, x.numel(), INTERP_BF16=interp_bf16, BLOCK=1024)


class _ChunkedSSE(torch.autograd.Function):
    """sum((S W^T + b - T)^2) as an fp32 scalar; gradients for S, W, b (never T).

    Forward computes the gradients too (when any input needs one) and keeps them until backward,
    which scales them by the incoming gradient: one pass over the tokens, no recompute. Computing
    them at gradient 1 (of the SSE, not of the mean) keeps dY = 2E of order 1, so fp16's dS does not
    fall into the subnormal range before the caller's loss scale is applied. dS is allocated in
    forward rather than backward; the IFD loss is the last node of the graph, so both allocate it
    while the model's activations are live.
    """

    @staticmethod
    def forward(ctx, s, t, w, b):
        need_s, _, need_w, need_b = ctx.needs_input_grad
        need_b = bool(need_b) and b is not None
        sse, ds, dw, db = chunked_sse_and_grads(s, t, w, b, need_s, need_w, need_b)
        ctx.grads = (ds, dw, db)
        ctx.dtypes = (w.dtype, b.dtype if b is not None else None)
        return sse

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("fused_ifd_loss(impl='triton') supports one backward only (its gradients "
                               "are computed in forward; retain_graph reuse would rescale them)")
        ds, dw, db = ctx.grads
        ctx.grads = None  # handed to autograd below and never touched by us again
        gscale = g.detach().reshape(1).to(torch.float32).contiguous()
        if ds is not None:
            _scale_(ds, gscale)
        if dw is not None:
            dw = dw.mul_(gscale).to(ctx.dtypes[0])
        if db is not None:
            db = db.mul_(gscale).to(ctx.dtypes[1])
        return ds, None, dw, db


def triton_sse(student, teacher, weight, bias):
    if not student.is_cuda and not interpreting():
        raise RuntimeError("fused_ifd_loss(impl='triton') needs CUDA tensors (or TRITON_INTERPRET=1 "
                           "set before triton is imported, for CPU testing)")
    if student.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fused_ifd_loss(impl='triton'): unsupported dtype {student.dtype}")
    return _ChunkedSSE.apply(student, teacher, weight, bias)
