"""Triton kernels of the fused IFD loss. Pure kernels; launch logic lives in triton_ifd.py.

The GEMMs are not here: they run in cuBLAS (torch.mm) chunk by chunk. What Triton does is the one
memory-bound pass between them, per chunk of tokens: read the projection Y = S W^T (compute dtype),
the teacher T and the bias, and in one read of Y produce the squared error, dY = 2(Y + b - T)
(written over Y, in place) and db's column sums.

Shapes inside a chunk: Y [M, N] (M tokens, N = d_t), T [M, N]. Every partial sum goes to a slot owned
by exactly one program, and chunks run in stream order, so slots accumulate across chunks without
atomics: results are bitwise reproducible run to run.

INTERP_BF16 is set only under TRITON_INTERPRET=1 with bf16 data, to work around a bug of the numpy
interpreter (triton 3.8) that the GPU does not have: its fp32 -> bf16 cast truncates instead of
rounding to nearest even, so we round explicitly first. On the GPU it is False and compiled out.
"""
import triton
import triton.language as tl


@triton.jit
def _rtne_bf16(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (interpreter only, see module doc)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _ifd_epilogue_kernel(
    y_ptr, t_ptr, b_ptr, sse_ptr, db_ptr,
    M, N, rows_per_program, stride_ym, stride_tm, stride_tn,
    HAS_BIAS: tl.constexpr, WANT_GRAD: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (g, j): rows [g * rows_per_program, ...) x columns [j * BLOCK_N, ...) of one chunk.

    E = Y + b - T in fp32 (Y as cuBLAS rounded it to the compute dtype, as eager PyTorch does).
    sse[g, j] += sum(E^2)              (fp64 slot; the chunk's part is summed in fp32 first)
    WANT_GRAD: Y <- dY = 2E in place   (compute dtype: the operand of the dS and dW GEMMs)
               db[g, cols] += colsum(dY) (fp32 slots)
    Out-of-range rows/cols are masked to 0, so they add nothing.
    """
    g = tl.program_id(0)
    j = tl.program_id(1)
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    sse_cols = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_cols = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = g * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        # int64 offsets: rows x N passes 2^31 in a large chunk.
        rm = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rm < row_end)[:, None] & mask_n[None, :]
        y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + rm[:, None] * stride_tm + rn[None, :] * stride_tn, mask=mask, other=0.0)
        err = y - t.to(tl.float32)
        if HAS_BIAS:
            err += bias[None, :]
        err = tl.where(mask, err, 0.0)
        sse_cols += tl.sum(err * err, axis=0)
        if WANT_GRAD:
            dy = 2.0 * err
            db_cols += tl.sum(dy, axis=0)
            if INTERP_BF16:
                dy = _rtne_bf16(dy)
            tl.store(y_ptrs, dy.to(y_ptr.dtype.element_ty), mask=mask)
    slot = g * tl.num_programs(1) + j
    tl.store(sse_ptr + slot, tl.load(sse_ptr + slot) + tl.sum(sse_cols, axis=0).to(tl.float64))
    if WANT_GRAD:
        db_ptrs = db_ptr + g * N + rn
        tl.store(db_ptrs, tl.load(db_ptrs, mask=mask_n, other=0.0) + db_cols, mask=mask_n)


@triton.jit
def _scale_kernel(x_ptr, g_ptr, numel, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """x *= g in fp32, g read from device memory (no host sync, and g is not rounded to x's dtype
    first, as torch's x.mul_(g) would for a 0-dim fp32 g and a bf16 x)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(g_ptr).to(tl.float32)
    if INTERP_BF16:
        y = _rtne_bf16(y)
    tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=mask)
