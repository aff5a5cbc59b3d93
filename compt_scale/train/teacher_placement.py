"""Where the frozen teacher lives under a ZeRO-3 student: replicated when it fits, else partitioned.

A ZeRO-3 teacher all-gathers every layer's weights in every forward (per micro-batch): for a teacher
that costs ~10% of a step's FLOPs, that communication and the hooks' host work cost far more than its
FLOP share. Replicated, it costs its weights' bytes on every rank and nothing per step.

Rule: replicate when the teacher's weights in the training dtype take at most REPLICATE_FRACTION of
the device's memory (5%: a 2B-parameter bf16 teacher on an 80 GiB GPU). The memory planner
(train/memory.py) counts a ZeRO-3 teacher as partitioned; 5% stays inside the 10% headroom it leaves.
Without a CUDA device there is no memory figure to decide by, and the teacher stays partitioned (the
CPU tests keep exercising the ZeRO-3 inference path).
"""
from __future__ import annotations

import torch

REPLICATE_FRACTION = 0.05


def replicate_teacher(teacher_params: int, dtype: torch.dtype, device_bytes: int | None = None) -> bool:
    if device_bytes is None:
        if not torch.cuda.is_available():
            return False
        device_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    itemsize = torch.empty((), dtype=dtype).element_size()
    return teacher_params * itemsize <= REPLICATE_FRACTION * device_bytes
