"""Growth into a live model, one parameter at a time, ZeRO-3 partitions included.

Under ZeRO-3 each rank holds a shard of every parameter. For each parameter in turn we gather just
that one (deepspeed.zero.GatheredParameters, modifier_rank=0), let rank 0 grow it in place from the
student's values it already holds, and DeepSpeed re-partitions rank 0's result on exit. Peak extra
memory is one full parameter, never the model. Unpartitioned models take the same path without the
gather.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..errors import CompTError
from .axes import Source
from .registry import grow_tensor, plan, source_key


def _gathered(p):
    if hasattr(p, "ds_id"):   # a ZeRO-3 partitioned parameter
        import deepspeed
        return deepspeed.zero.GatheredParameters([p], modifier_rank=0)
    return contextlib.nullcontext()


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def grow_into_model(model: torch.nn.Module, src_state_or_reader, src_config, tgt_config, width: str = "insert",
                    depth: str = "duplicate", noise_snr: float | None = None,
                    generator: torch.Generator | None = None) -> dict:
    """Grow `src` into `model`'s parameters in place; the model's current values are the student init.

    `src_state_or_reader`: a state dict, an HF model dir (read lazily with SafetensorsReader), or a
    SafetensorsReader. Only rank 0 reads it. Returns the report (complete on rank 0).
    """
    if isinstance(src_state_or_reader, (str, Path)):
        from .stream import SafetensorsReader
        src_state_or_reader = SafetensorsReader(src_state_or_reader)
    src = src_state_or_reader
    params = dict(model.named_parameters())   # tied parameters appear once, under their first name
    steps, report, layout = plan(src_config, tgt_config, list(params), width, depth, noise_snr)
    if report["config_changes"]:   # the growth must untie, and this live model is still tied
        raise CompTError("width 'clone' unties embeddings, which a live tied model cannot do: build the "
                         "target with tie_word_embeddings=False")
    rank = _rank()
    err = None
    if rank == 0:   # resolve every source before the first collective, so a bad source fails all ranks
        try:
            for st in steps:
                if st.src_key is not None:
                    st.src_key = source_key(layout, src_config, st.src_key, src)
        except CompTError as e:
            err = str(e)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [err]
        torch.distributed.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise CompTError(err)
    for st in steps:
        p = params[st.key]
        with _gathered(p), torch.no_grad():
            if rank == 0:
                s = None
                if st.src_key is not None:
                    s = src.source(st.src_key) if hasattr(src, "source") else Source(src[st.src_key].detach())
                report["tensors"][st.key] = grow_tensor(st, s, p.data, layout, src_config, tgt_config,
                                                        width, noise_snr, generator)
    return report
