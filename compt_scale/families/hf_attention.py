"""Attention for the HF decoders: causal SDPA with no mask tensor at all, and document masks as
flex-attention block masks on CUDA.

transformers' "sdpa" implementation already calls SDPA with `is_causal=True` and no mask when it is
given no attention mask, but before that it looks at the position ids for packed sequences
(masking_utils.find_packed_sequence_indices) and branches on the result in Python: one host sync per
forward, and under torch.compile of the whole model a dense causal mask instead (no flash/cuDNN).
The implementations registered here are the same attention functions under names transformers has no
mask builder for, so `create_causal_mask` returns the mask it was given as it is (None: causal) with
no check, and the attention layer calls SDPA with `is_causal=True` and `attn_mask=None`:

- CAUSAL_SDPA ("compt_sdpa"): transformers' sdpa_attention_forward; a 4D mask passed in (documents
  masked on CPU: model_inputs) is used as given.
- DOC_FLEX ("compt_flex"): transformers' flex_attention_forward, given a BlockMask built from the
  position ids (positions restart at 0 after each EOS): CUDA only, document masking without a dense
  [T, T] mask and with the sparsity of the block-diagonal causal pattern skipped, not computed.

Only the in-memory config is touched: `_attn_implementation` is not written to config.json, so an
export loads with plain transformers as before.
"""
from __future__ import annotations

import torch

CAUSAL_SDPA = "compt_sdpa"
DOC_FLEX = "compt_flex"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    AttentionInterface.register(DOC_FLEX, flex_attention_forward)
    _registered = True


def use_causal_sdpa(model) -> None:
    """Switch a freshly built or loaded decoder to CAUSAL_SDPA (models that support SDPA)."""
    register()
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(CAUSAL_SDPA)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of each token's document: positions restart at 0 at every document start."""
    return (position_ids == 0).cumsum(dim=1)


def dense_document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool (True = attend): causal and inside the token's document (the CPU path)."""
    doc = document_ids(position_ids)
    T = position_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def document_block_mask(position_ids: torch.Tensor):
    """The same mask as dense_document_mask, as a flex-attention BlockMask (built on the device,
    no host sync: create_block_mask evaluates the mask function on blocks)."""
    from torch.nn.attention.flex_attention import create_block_mask
    doc = document_ids(position_ids)
    B, T = doc.shape

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (doc[b, q] == doc[b, kv])

    return create_block_mask(mask_mod, B, None, T, T, device=position_ids.device)


def attention_inputs(model, position_ids: torch.Tensor) -> dict:
    """The attention keyword inputs for packed documents: a BlockMask on CUDA (switching the model to
    DOC_FLEX the first time), the dense mask elsewhere."""
    if position_ids.is_cuda:
        if model is not None and model.config._attn_implementation != DOC_FLEX:
            register()
            model.set_attn_implementation(DOC_FLEX)
        if model is not None:
            return {"attention_mask": document_block_mask(position_ids)}
    return {"attention_mask": dense_document_mask(position_ids)}
