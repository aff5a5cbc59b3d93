"""The fused chunked linear cross-entropy against torch's cross_entropy in float64 (the oracle):
loss and both gradients, fp32 and bf16, a token count that is not a multiple of the chunk, ignored
labels, and the LM losses of an HF decoder computed through it and through the plain model."""
from __future__ import annotations

import pytest
import torch

from compt_scale.families.chunked_ce import IGNORE_INDEX, linear_cross_entropy

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _oracle(h, w, y):
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(h64 @ w64.t(), y)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradients_match_float64_cross_entropy(dtype):
    g = torch.Generator().manual_seed(0)
    n, d, v = 1000, 48, 301
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).requires_grad_()     # fp32 master weight
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = IGNORE_INDEX
    loss = linear_cross_entropy(h, w, y, chunk=128)                      # 7 full chunks + 104
    (loss * 3.0).backward()                                              # a non-unit upstream gradient
    ref, gh, gw = _oracle(h, w.to(dtype).float(), y)
    tol = TOL[dtype]
    assert abs(loss.item() - ref.item()) <= tol * ref.item()
    assert h.grad.dtype == dtype and w.grad.dtype == torch.float32
    assert _rel(h.grad / 3.0, gh) < tol and _rel(w.grad / 3.0, gw) < tol
    with torch.no_grad():                                               # eval path: same value
        assert abs(linear_cross_entropy(h, w, y, chunk=128).item() - loss.item()) <= tol * ref.item()


def test_decoder_loss_equals_the_plain_model_loss():
    from compt_scale.families import get_family
    fam = get_family("hf_decoder")
    model = fam.build(fam.load_config("llama-xs", vocab_size=512), seed=0)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    task, _ = fam.losses(model, (x, y))
    task.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=x).logits
    ref = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 512), y.reshape(-1))
    ref.backward()
    torch.testing.assert_close(task, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
