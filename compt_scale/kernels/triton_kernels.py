"""Triton kernels of the fused IFD loss. Pure kernels; launch logic lives in triton_ifd.py.

Shapes: S [M, K] (student, K = d_s), W [N, K] (weight, N = d_t), T [M, N] (teacher).
All accumulation is fp32. Every output tile is owned by exactly one program and partial sums are
written to per-program slots that the host reduces in a fixed order: no atomics, so results are
bitwise reproducible run to run.

INTERP_BF16 is set only under TRITON_INTERPRET=1 with bf16 inputs, to work around two bugs of the
numpy interpreter (triton 3.8) that the GPU does not have: its bf16 tl.dot multiplies raw bits (we
widen the operands to fp32: bf16 products are exact in fp32, so the math is the GPU's), and its
fp32 -> bf16 cast truncates instead of rounding to nearest even (we round explicitly first).
On the GPU the flag is False and those branches are compiled out.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ("swizzled") launch order: consecutive programs share A row-blocks in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _rtne_bf16(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (interpreter only, see module doc)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tile_matmul(a_ptr, b_ptr, rm, rn, mask_m, mask_n, K, stride_am, stride_ak, stride_bk, stride_bn,
                 INPUT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile of A[rm, :] @ B[:, rn], B cast to A's dtype (e.g. an fp32 master weight against
    bf16 activations). Out-of-range rows/cols/k load as 0, so they add nothing."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if INTERP_BF16:
            a = a.to(tl.float32)
            b = _rtne_bf16(b.to(tl.float32))
        else:
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _proj_err_kernel(
    s_ptr, w_ptr, b_ptr, t_ptr, out_ptr, db_ptr, sse_ptr, gscale_ptr,
    M, N, K,
    stride_sm, stride_sk, stride_wn, stride_wk, stride_tm, stride_tn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, WRITE_SSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y tile = S W^T + b, then in the epilogue E = Y - T (fp32).

    WRITE_SSE: sse[pid_m, pid_n] = sum(E^2) over the tile (the loss partials).
    WRITE_GRAD: dY = 2 * gscale * E is stored to out (the chunk buffer, in the compute dtype) and
    db[pid_m, n] = column sums of the fp32 dY (db partials).
    Out-of-range rows/cols are masked to 0 so they add nothing to the sums.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # int64 rows: N * d_s passes 2^31 at ~512K tokens x 4096 and the offsets would wrap in int32.
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    # S @ W^T: W^T is W read with its strides swapped.
    acc = _tile_matmul(s_ptr, w_ptr, rm, rn, mask_m, mask_n, K, stride_sm, stride_sk, stride_wk, stride_wn,
                       INPUT_PRECISION, INTERP_BF16, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:  # added to the fp32 accumulator in fp32 (not rounded to the compute dtype)
        bias = tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    t = tl.load(t_ptr + rm[:, None] * stride_tm + rn[None, :] * stride_tn, mask=mask, other=0.0)
    err = tl.where(mask, acc - t.to(tl.float32), 0.0)
    if WRITE_SSE:
        tl.store(sse_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n,
                 tl.sum(tl.sum(err * err, axis=1), axis=0))
    if WRITE_GRAD:
        gscale = tl.load(gscale_ptr).to(tl.float32)
        dy = err * (2.0 * gscale)
        tl.store(db_ptr + pid_m * N + rn, tl.sum(dy, axis=0), mask=mask_n)
        if INTERP_BF16:
            dy = _rtne_bf16(dy)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
                 dy.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] (+)= A[M, K] @ B[K, N], fp32 accumulation, B cast to A's dtype.

    ACCUMULATE: C is an fp32 buffer that already holds earlier chunks' sums (dW across token
    chunks): loaded, added to and stored by the single program owning the tile, chunks run in
    order, so the accumulation is fp32 and deterministic.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # int64 rows: N * d_s passes 2^31 at ~512K tokens x 4096 and the offsets would wrap in int32.
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = _tile_matmul(a_ptr, b_ptr, rm, rn, mask_m, mask_n, K, stride_am, stride_ak, stride_bk, stride_bn,
                       INPUT_PRECISION, INTERP_BF16, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = mask_m[:, None] & mask_n[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0)
    elif INTERP_BF16:
        acc = _rtne_bf16(acc)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(x_ptr, g_ptr, numel, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """x *= g in fp32, g read from device memory (no host sync, no bf16 rounding of g)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(g_ptr).to(tl.float32)
    if INTERP_BF16:
        y = _rtne_bf16(y)
    tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=mask)
