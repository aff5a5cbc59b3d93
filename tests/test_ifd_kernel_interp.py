"""The chunked IFD kernel on CPU (its Triton pass under TRITON_INTERPRET=1), against a float64 oracle.

This module only runs in a process started with TRITON_INTERPRET=1 in its environment (the
interpreter is chosen when triton is imported, and another test may have imported triton already):
tests/test_ifd_kernel.py::test_triton_interpreter_suite starts such a pytest process. Collected by
the main run, it skips itself. The GEMMs run in torch on CPU here (cuBLAS on a GPU).

Tolerances: gradients max|error| / max|oracle| per tensor, value relative error; the oracle is fp64
math on the same inputs with W and the projection S W^T rounded to the compute dtype (the defined
semantics, see tests/ifd_oracle.py).
  fp32: value 1e-6, gradients 1e-5 (seen ~3e-7).
  bf16: value 1e-5 (seen ~2e-7), gradients 1e-2 (seen ~5e-3: dY is rounded to bf16 before the dS/dW
        GEMMs and dS is returned in bf16, as in eager).
  fp16: value 1e-5, gradients 2e-3 (seen ~4e-4).
"""
import os
import zlib
from contextlib import contextmanager

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 at process start (run by test_ifd_kernel.py)",
                allow_module_level=True)

import torch  # noqa: E402

from compt_scale.kernels import IFDProjection, fused_ifd_loss, ifd, triton_ifd  # noqa: E402
from compt_scale.kernels.triton_kernels import _ifd_epilogue_kernel  # noqa: E402
from ifd_oracle import oracle, rel  # noqa: E402

TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-5, 1e-2), torch.float16: (1e-5, 2e-3)}


@contextmanager
def count_pass_launches():
    """Counts launches of the real Triton pass (a pre-run hook of the kernel object itself)."""
    launches = []

    def hook(*args, **kwargs):
        launches.append(1)

    _ifd_epilogue_kernel.add_pre_run_hook(hook)
    try:
        yield launches
    finally:
        _ifd_epilogue_kernel.pre_run_hooks.remove(hook)


@pytest.fixture
def chunking(monkeypatch):
    """set(chunk_bytes, min_chunks): how the kernel cuts tokens into chunks for this test."""
    def set_(chunk_bytes, min_chunks=1):
        monkeypatch.setattr(triton_ifd, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(triton_ifd, "MIN_CHUNKS", min_chunks)
    return set_


def _inputs(n, d_s, d_t, dtype, bias, gen):
    s = torch.randn(n, d_s, generator=gen).to(dtype)
    t = torch.randn(n, d_t, generator=gen).to(dtype)
    w = (torch.randn(d_t, d_s, generator=gen) / d_s ** 0.5)  # fp32 master weight
    b = torch.randn(d_t, generator=gen) if bias else None
    return s, t, w, b


def _check(s, t, w, b, alpha, dtype, chunks=None):
    s_ = s.clone().requires_grad_()
    w_ = w.clone().requires_grad_()
    b_ = b.clone().requires_grad_() if b is not None else None
    t_ = t.clone().requires_grad_()  # must still get no gradient
    with count_pass_launches() as launches:
        loss = fused_ifd_loss(s_, t_, w_, b_, alpha, impl="triton")
    loss.backward()
    if chunks is not None:  # one Triton pass per chunk: the chunking really happened
        assert len(launches) == chunks
    ref, gs, gw, gb = oracle(s, t, w, b, alpha)
    vtol, gtol = TOL[dtype]
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= vtol * abs(ref.item())
    assert s_.grad.dtype == dtype and w_.grad.dtype == torch.float32
    assert rel(s_.grad, gs) < gtol
    assert rel(w_.grad, gw) < gtol
    if b is not None:
        assert rel(b_.grad, gb) < gtol
    assert t_.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_fp64_oracle_one_and_many_chunks(dtype, chunking):
    """Random odd shapes; 1 chunk, then chunks of 8 or 16 rows that do not divide N (a short last
    chunk); bias on and off; alpha 0.37 and 2.0."""
    gen = torch.Generator().manual_seed(zlib.crc32(str(dtype).encode()))
    for i, rows in enumerate((None, 8, 16)):
        n, d_s, d_t = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in
                       ((41, 90), (7, 60), (5, 50)))
        n += n % 8 == 0  # never a multiple of 8: the last chunk is always short
        elt = torch.empty((), dtype=dtype).element_size()
        chunking(1 << 30 if rows is None else rows * d_t * elt)
        chunks = 1 if rows is None else -(-n // rows)
        s, t, w, b = _inputs(n, d_s, d_t, dtype, bias=i != 1, gen=gen)
        _check(s, t, w, b, alpha=0.37 if i != 2 else 2.0, dtype=dtype, chunks=chunks)


def test_chunk_rows_rule(chunking):
    """CHUNK_BYTES caps a chunk's Y bytes, MIN_CHUNKS its share of the tokens; rows stay aligned."""
    chunking(16 << 20, 8)
    assert triton_ifd.chunk_rows(64 * 1024, 2048, 2) == 4096      # bytes cap: 16 MiB / (2048 x 2)
    assert triton_ifd.chunk_rows(8 * 1024, 512, 2) == 1024        # 1/8 of the tokens
    assert triton_ifd.chunk_rows(61, 29, 4) == 8                  # never below ROW_ALIGN...
    assert triton_ifd.chunk_rows(5, 29, 4) == 5                   # ...nor above N
    assert triton_ifd.chunk_rows(1000, 100, 2) % triton_ifd.ROW_ALIGN == 0


def test_impl_switch_runs_what_it_says(chunking):
    """impl='triton' runs the Triton pass; 'reference' and 'auto' on CPU tensors never launch it and
    give the reference's result; IFDProjection passes its impl through."""
    gen = torch.Generator().manual_seed(13)
    s, t, w, b = _inputs(45, 20, 17, torch.float32, True, gen)
    chunking(16 * 17 * 4)
    with count_pass_launches() as launches:
        via_triton = fused_ifd_loss(s, t, w, b, impl="triton")
    assert len(launches) == 3  # 45 tokens in chunks of 16
    want = ifd.reference_sse(s, t, w, b) / t.numel()
    for impl in ("reference", "auto", None):
        with count_pass_launches() as launches:
            got = fused_ifd_loss(s, t, w, b, impl=impl)
        assert launches == [] and torch.equal(got, want)
    torch.testing.assert_close(via_triton, want, rtol=1e-6, atol=0)
    for impl, expect in (("triton", 3), ("reference", 0), ("auto", 0)):
        proj = IFDProjection(20, 17, init="default", impl=impl)
        with count_pass_launches() as launches:
            proj(s, t).backward()
        assert len(launches) == expect and proj.weight.grad is not None


def test_no_grad_and_single_backward(chunking):
    gen = torch.Generator().manual_seed(11)
    s, t, w, b = _inputs(30, 20, 17, torch.float32, True, gen)
    chunking(8 * 17 * 4)
    with torch.no_grad():  # no input needs a gradient: the value only
        v = fused_ifd_loss(s, t, w, b, impl="triton")
    w_ = w.clone().requires_grad_()
    loss = fused_ifd_loss(s, t, w_, b, impl="triton")
    assert torch.equal(v, loss.detach())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_default_chunking_and_exact_multiples():
    gen = torch.Generator().manual_seed(7)
    _check(*_inputs(64, 64, 32, torch.float32, True, gen), alpha=1.0, dtype=torch.float32, chunks=8)
    _check(*_inputs(100, 70, 33, torch.bfloat16, True, gen), alpha=2.0, dtype=torch.bfloat16)


def test_alpha_tensor_and_non_contiguous_inputs(chunking):
    gen = torch.Generator().manual_seed(3)
    chunking(16 * 30 * 4)
    s = torch.randn(50, 80, generator=gen)[:, ::2]           # row stride 80, col stride 2
    t = torch.randn(30, 50, generator=gen).t()                # transposed view
    w = torch.randn(40, 30, generator=gen).t() / 6            # [30, 40] transposed view
    _check(s, t, w, None, alpha=torch.tensor(0.6), dtype=torch.float32, chunks=4)


def test_deterministic_bitwise(chunking):
    gen = torch.Generator().manual_seed(5)
    s, t, w, b = _inputs(61, 37, 29, torch.bfloat16, True, gen)
    chunking(16 * 29 * 2)
    outs = []
    for _ in range(2):
        s_, w_, b_ = (x.clone().requires_grad_() for x in (s, w, b))
        loss = fused_ifd_loss(s_, t, w_, b_, 0.5, impl="triton")
        loss.backward()
        outs.append((loss, s_.grad, w_.grad, b_.grad))
    for a, b2 in zip(*outs, strict=True):
        assert torch.equal(a, b2)


def test_autocast_and_empty(chunking):
    gen = torch.Generator().manual_seed(9)
    s, t, w, b = _inputs(33, 20, 18, torch.float32, True, gen)
    chunking(8 * 18 * 2)
    s_ = s.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_ifd_loss(s_, t, w, b, 1.0, impl="triton")
    loss.backward()
    ref = fused_ifd_loss(s.bfloat16(), t, w, b, 1.0, impl="reference")
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    assert s_.grad.dtype == torch.float32   # the autocast cast is differentiated back to fp32
    s0 = torch.zeros(0, 20, requires_grad=True)
    w0 = w.clone().requires_grad_()
    sse = triton_ifd.triton_sse(s0, torch.zeros(0, 18), w0, None)
    sse.backward()
    assert sse.item() == 0.0 and s0.grad.shape == (0, 20) and torch.all(w0.grad == 0)
