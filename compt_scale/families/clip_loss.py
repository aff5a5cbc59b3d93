"""LaCLIP's task loss over M captions per image (CoM-PT paper, eq. 2-3).

Each image feature v_i has M positive text features t_ij (augmented captions of the same image):

    L_t2v = - sum_i sum_j log exp(cos<t_ij, v_i>/tau) / sum_k exp(cos<t_ij, v_k>/tau)      (2)
    L_v2t = - sum_i sum_j log exp(cos<v_i, t_ij>/tau) / sum_k exp(cos<v_i, t_kj>/tau)       (dual)
    L_task = (L_t2v + L_v2t) / 2                                                             (3)

The dual is eq. 2 with the roles of image and text exchanged: caption j of image i competes with the
same caption slot j of every other image (as in open_clip's ClipLoss for each slot), so L_task is M
ordinary CLIP losses, one per caption slot, summed. The paper writes sums; this module averages
over the N x M terms (1 / (N M)), so M = 1 is exactly open_clip's mean-reduced ClipLoss and the
loss scale (and alpha, and the learning rate) does not depend on the batch size or M.

Global negatives: with > 1 rank, image and text features are all-gathered with gradient (open_clip's
`gather_features(..., gather_with_grad=True)`), so N is the global batch and every rank computes the
same global loss; all_gather's backward routes each rank's share of the gradient to its samples.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous. all_gather's backward sends
    slices of the gathered tensor's gradient between ranks; gloo's collectives read a non-contiguous
    slice (the einsum below produces a permuted gradient) as if it were contiguous: wrong gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def gather(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global [N, D] image and [N, M, D] text features (identity on one rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image, text
    from open_clip.loss import gather_features
    b, m, d = text.shape
    img, txt = gather_features(image.contiguous(), text.reshape(b, m * d).contiguous(), gather_with_grad=True,
                               rank=dist.get_rank(), world_size=dist.get_world_size())
    return _ContiguousGrad.apply(img), _ContiguousGrad.apply(txt).reshape(-1, m, d)


def laclip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Eq. 2-3 averaged over N x M. image [B, D], text [B, M, D]: L2-normalized (CLIP.forward's
    output), so a dot product is the cosine; logit_scale = 1 / tau."""
    if text.dim() == 2:
        text = text.unsqueeze(1)
    image, text = gather(image, text)
    n, m, _ = text.shape
    labels = torch.arange(n, device=image.device)
    # logits[j, a, b] = cos<v_a, t_bj> / tau: per caption slot j, rows are images, columns captions
    logits = logit_scale * torch.einsum("ad,bjd->jab", image, text)
    v2t = F.cross_entropy(logits.reshape(m * n, n), labels.repeat(m))
    t2v = F.cross_entropy(logits.transpose(1, 2).reshape(m * n, n), labels.repeat(m))
    return (t2v + v2t) / 2
