"""fused_ifd_loss / IFDProjection API (reference path), and the Triton interpreter suite.

The Triton kernels are tested in tests/test_ifd_kernel_interp.py, which needs TRITON_INTERPRET=1
in the environment of a process that has not imported triton yet: test_triton_interpreter_suite
runs it in its own pytest process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compt_scale.kernels import IFDProjection, fused_ifd_loss

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_triton_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(HERE / "test_ifd_kernel_interp.py")],
                       env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert " passed" in p.stdout and "skipped" not in p.stdout, p.stdout[-2000:]


@pytest.mark.parametrize("bias", [True, False])
def test_reference_equals_mse_loss_value_and_grads(bias):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(37, 19, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(37, 11, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 19, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    loss = fused_ifd_loss(s, t, w, b, alpha=0.3)
    params = [s, w] + ([b] if bias else [])
    got = torch.autograd.grad(loss, params)
    ref = 0.3 * F.mse_loss(F.linear(s, w, b), t.detach())
    want = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)
    loss = fused_ifd_loss(s, t, w, b)
    loss.backward()
    assert t.grad is None  # teacher is never differentiated


def test_cpu_dispatch_is_reference_and_autocast():
    s, t, w = torch.randn(8, 6), torch.randn(8, 4), torch.randn(4, 6)
    # On CPU the default is the reference (Triton would need CUDA or the interpreter).
    torch.testing.assert_close(fused_ifd_loss(s, t, w), fused_ifd_loss(s, t, w, impl="reference"))
    s.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_ifd_loss(s, t, w)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == torch.float32
    want = fused_ifd_loss(s.detach().bfloat16(), t, w)
    torch.testing.assert_close(loss.detach(), want)


def test_bad_inputs_raise():
    s, t, w = torch.randn(8, 6), torch.randn(8, 4), torch.randn(4, 6)
    with pytest.raises(ValueError):
        fused_ifd_loss(s, t[:, :3], w)
    with pytest.raises(ValueError):
        fused_ifd_loss(s, t, w, torch.zeros(3))
    with pytest.raises(ValueError):
        fused_ifd_loss(s, t, w, impl="cuda")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="CUDA"):
            fused_ifd_loss(s, t, w, impl="triton")


def test_projection_identity_init_flattens_and_trains():
    proj = IFDProjection(10, 6)
    s = torch.randn(2, 5, 10)
    # identity init: T picks the leading d_t student coordinates (width growth by insert)
    assert proj(s, s[..., :6]).item() == 0.0
    assert torch.equal(proj.weight[:, :6], torch.eye(6)) and torch.all(proj.weight[:, 6:] == 0)
    t = torch.randn(2, 5, 6)
    loss = proj(s, t, alpha=2.0)
    torch.testing.assert_close(loss, 2.0 * F.mse_loss(F.linear(s, proj.weight, proj.bias), t))
    loss.backward()
    assert proj.weight.grad is not None and proj.bias.grad is not None
    wide = IFDProjection(4, 6)   # d_s < d_t: default nn.Linear init
    assert wide.weight.abs().sum() > 0 and not torch.all(wide.bias == 0)
    assert IFDProjection(6, 6, bias=False).bias is None


@pytest.mark.slow
def test_benchmark_cpu_smoke(tmp_path):
    """The benchmark script itself, --smoke on CPU (GPU figures are only produced on a GPU machine):
    every implementation measured at every shape, the kernel's value equal to the reference's."""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "ifd_kernel.py"), "--smoke",
                        "--chunk-mib", "0.002", "--out", str(out)], cwd=HERE.parent, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    import json
    res = json.loads(out.read_text())
    assert len(res["results"]) == 4 and "extra_bytes" in res["definitions"]
    for row in res["results"]:
        assert {"eager", "compile", "reference", "kernel", "kernel@0.002MiB"} <= row.keys()
        for k in ("kernel", "kernel@0.002MiB"):  # both round S W^T to bf16, then fp32 error and sums
            assert row[k]["ms"] > 0 and row[k]["loss_rel_diff_vs_reference"] < 1e-5
