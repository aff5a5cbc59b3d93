"""Cross-entropy of a linear head, chunk by chunk, with both gradients computed in the forward
(as liger-kernel's fused linear cross-entropy does, in plain torch ops): the [tokens, vocab] logits
exist one chunk at a time and are never saved or recomputed, and nothing is read back to the host.

Per chunk of C tokens: logits = h W^T (the input dtype's GEMM, then fp32), loss += sum(lse - logit_y),
G = softmax - onehot(y) (ignored labels: 0), dH = G W, dW += G^T h (fp32 accumulator). The backward
only scales the saved dH, dW by grad_output / n_valid. Compared with recomputing each chunk's logits
in backward (torch.utils.checkpoint), that saves one [C, d] x [d, V] GEMM per chunk; what it holds
from forward to backward is dH (the size of the hidden states) and dW (one fp32 copy of W).

W is read directly, so it must be a whole tensor: under ZeRO-3 (partitioned parameters, gathered only
inside the head module's own forward) the caller keeps the checkpointed path.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
        n = hidden.size(0)
        valid_all = labels != IGNORE_INDEX
        n_valid = valid_all.sum().clamp(min=1).float()        # stays on the device
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)
        for s in range(0, n, chunk):
            h, y, valid = hidden[s:s + chunk], labels[s:s + chunk], valid_all[s:s + chunk]
            logits = (h @ w.t()).float()
            y_safe = torch.where(valid, y, 0)[:, None]
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, y_safe)[:, 0]) * valid).sum()
            g = logits.sub_(lse[:, None]).exp_()                 # softmax, in place of the logits
            g.scatter_add_(1, y_safe, torch.full_like(y_safe, -1, dtype=g.dtype))
            g.mul_(valid[:, None])
            g = g.to(hidden.dtype)
            grad_h[s:s + chunk] = g @ w
            if grad_w is not None:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0), n_valid)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        dh = grad_h * scale.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_w * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = 2048) -> torch.Tensor:
    """Mean cross-entropy of hidden @ weight^T against labels (IGNORE_INDEX rows left out)."""
    h, y = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        with torch.no_grad():   # eval: no gradients to compute
            tot = sum(torch.nn.functional.cross_entropy((h[s:s + chunk] @ weight.to(h.dtype).t()).float(),
                                                        y[s:s + chunk], reduction="sum")
                      for s in range(0, y.numel(), chunk))
            return tot / (y != IGNORE_INDEX).sum().clamp(min=1)
    return ChunkedLinearCrossEntropy.apply(h, weight, y, chunk)
