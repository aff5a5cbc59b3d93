"""Triton IFD kernel on CPU under TRITON_INTERPRET=1, against a float64 oracle.

This module only runs in a process started with TRITON_INTERPRET=1 in its environment (the
interpreter is chosen when triton is imported, and another test may have imported triton already):
tests/test_ifd_kernel.py::test_triton_interpreter_suite starts such a pytest process. Collected by
the main run, it skips itself.

Tolerances: gradients max|error| / max|oracle| per tensor, value relative error; the oracle is fp64
math on the same inputs with W rounded to the compute dtype (the defined semantics, see reference.py).
  fp32: value 1e-6, gradients 1e-5 (seen: ~1e-7).
  bf16: value 1e-5 (seen ~1e-7: Y and the error stay fp32 in the kernel), gradients 1e-2 (seen
        ~3e-3: dY is stored in bf16 before the dS/dW GEMMs and dS is returned in bf16, as in eager).
  fp16: value 1e-5, gradients 2e-3 (seen ~3e-4).
"""
import os
import zlib

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 at process start (run by test_ifd_kernel.py)",
                allow_module_level=True)

import torch  # noqa: E402

from compt_scale.kernels import (
    fused_ifd_loss,  # noqa: E402
    triton_ifd,  # noqa: E402
)
from ifd_oracle import oracle, rel  # noqa: E402

TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-5, 1e-2), torch.float16: (1e-5, 2e-3)}


@pytest.fixture
def small_blocks():
    # 16-wide tiles and 24-row chunks: odd sizes hit every mask and several backward chunks.
    triton_ifd.BLOCK_OVERRIDE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4,
                                     num_stages=1)
    triton_ifd.CHUNK_ROWS_OVERRIDE = 24
    yield
    triton_ifd.BLOCK_OVERRIDE = None
    triton_ifd.CHUNK_ROWS_OVERRIDE = None


def _inputs(n, d_s, d_t, dtype, bias, gen):
    s = torch.randn(n, d_s, generator=gen).to(dtype)
    t = torch.randn(n, d_t, generator=gen).to(dtype)
    w = (torch.randn(d_t, d_s, generator=gen) / d_s ** 0.5)  # fp32 master weight
    b = torch.randn(d_t, generator=gen) if bias else None
    return s, t, w, b




def _check(s, t, w, b, alpha, dtype, mode="recompute"):
    s_ = s.clone().requires_grad_()
    w_ = w.clone().requires_grad_()
    b_ = b.clone().requires_grad_() if b is not None else None
    t_ = t.clone().requires_grad_()  # must still get no gradient
    loss = fused_ifd_loss(s_, t_, w_, b_, alpha, impl="triton", triton_mode=mode)
    loss.backward()
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


@pytest.mark.parametrize("mode", ["recompute", "precompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_fp64_oracle_random_odd_shapes(dtype, mode, small_blocks):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}/{mode}".encode()))
    for i in range(3):
        n, d_s, d_t = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in
                       ((20, 90), (7, 60), (5, 50)))
        _check(*_inputs(n, d_s, d_t, dtype, bias=i != 1, gen=gen), alpha=0.37, dtype=dtype, mode=mode)


def test_precompute_mode_no_grad_and_single_backward(small_blocks):
    gen = torch.Generator().manual_seed(11)
    s, t, w, b = _inputs(30, 20, 17, torch.float32, True, gen)
    with torch.no_grad():  # no input needs a gradient: value only, same as recompute
        v = fused_ifd_loss(s, t, w, b, impl="triton", triton_mode="precompute")
    assert torch.equal(v, fused_ifd_loss(s, t, w, b, impl="triton"))
    w_ = w.clone().requires_grad_()
    loss = fused_ifd_loss(s, t, w_, b, impl="triton", triton_mode="precompute")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_default_blocks_and_exact_multiples():
    gen = torch.Generator().manual_seed(7)
    _check(*_inputs(64, 64, 32, torch.float32, True, gen), alpha=1.0, dtype=torch.float32)
    _check(*_inputs(100, 70, 33, torch.bfloat16, True, gen), alpha=2.0, dtype=torch.bfloat16)


def test_non_contiguous_inputs(small_blocks):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(50, 80, generator=gen)[:, ::2]           # row stride 80, col stride 2
    t = torch.randn(30, 50, generator=gen).t()                # transposed view
    w = torch.randn(40, 30, generator=gen).t() / 6            # [30, 40] transposed view
    _check(s, t, w, None, alpha=1.0, dtype=torch.float32)


def test_deterministic_bitwise(small_blocks):
    gen = torch.Generator().manual_seed(5)
    s, t, w, b = _inputs(61, 37, 29, torch.bfloat16, True, gen)
    outs = []
    for _ in range(2):
        s_, w_, b_ = (x.clone().requires_grad_() for x in (s, w, b))
        loss = fused_ifd_loss(s_, t, w_, b_, 0.5, impl="triton")
        loss.backward()
        outs.append((loss, s_.grad, w_.grad, b_.grad))
    for a, b2 in zip(*outs, strict=True):
        assert torch.equal(a, b2)


def test_autocast_and_empty(small_blocks):
    gen = torch.Generator().manual_seed(9)
    s, t, w, b = _inputs(33, 20, 18, torch.float32, True, gen)
    s_ = s.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_ifd_loss(s_, t, w, b, 1.0, impl="triton")
    loss.backward()
    ref = fused_ifd_loss(s.bfloat16(), t, w, b, 1.0, impl="reference")
    assert abs(loss.item() - ref.item()) < 5e-3 * ref.item()
    assert s_.grad.dtype == torch.float32   # the autocast cast is differentiated back to fp32
    s0 = torch.zeros(0, 20, requires_grad=True)
    w0 = w.clone().requires_grad_()
    sse = triton_ifd.triton_sse(s0, torch.zeros(0, 18), w0, None)
    sse.backward()
    assert sse.item() == 0.0 and s0.grad.shape == (0, 20) and torch.all(w0.grad == 0)
