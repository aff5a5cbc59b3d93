"""Per-GPU memory of one stage, by ZeRO preset: what `plan --gpus N --gpu-mem M` prints and what
`train.zero_stage: auto` picks the preset from (bytes per GPU, not parameter count).

- Model states: DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
  `estimate_zero3_model_states_mem_needs`, mixed precision + Adam). DeepSpeed has none for ZeRO-1: it is
  ZeRO-2's figure plus the full 16-bit gradients every rank keeps (2 bytes/param).
- Teacher: frozen, 16-bit, partitioned over all ranks under a ZeRO-3 student (chain/weights.py), whole
  on every rank otherwise.
- Activations: Korthikanti et al. 2022 ("Reducing activation recomputation", eq. 2, 16-bit, no tensor
  or sequence parallelism): s*b*h*(34 + 5*a*s/h) bytes per transformer layer. With activation
  checkpointing each layer keeps only its 16-bit input (2*s*b*h) and one layer is recomputed at a time.
The sum is compared with HEADROOM x the GPU's memory (CUDA context, allocator fragmentation, NCCL).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..units import parse_bytes  # noqa: F401  (memory sizes in specs and --gpu-mem)

GIB = 2**30
HEADROOM = 0.9
DEFAULT_GPU_MEM = 80 * GIB
# (preset, ZeRO stage, optimizer + parameters offloaded to CPU), in the order `auto` tries them.
PRESETS = (("zero1-small", 1, False), ("zero2-medium", 2, False), ("zero3-large", 3, False),
           ("zero3-offload-xl", 3, True))


def model_states(n_params: int, largest_param: int, zero_stage: int, offload: bool, gpus_per_node: int,
                 nodes: int) -> int:
    """Bytes per GPU of parameters, gradients and Adam states (DeepSpeed's estimators)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    if zero_stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(n_params, largest_param, gpus_per_node, nodes,
                                                          cpu_offload=offload, cpu_offload_params=offload)
        return int(gpu)
    _, gpu = estimate_zero2_model_states_mem_needs(n_params, gpus_per_node, nodes, cpu_offload=offload)
    return int(gpu) + (2 * n_params if zero_stage <= 1 else 0)


def layer_activations(tokens: int, hidden: int, heads: int, micro_batch: int) -> int:
    """Korthikanti et al. eq. 2: bytes one transformer layer keeps for backward (16-bit)."""
    s, b, h, a = tokens, micro_batch, hidden, heads
    return int(s * b * h * (34 + 5 * a * s / h))


def activations(towers: list[tuple[int, int, int, int]], micro_batch: int, checkpointing: bool) -> int:
    """towers: (tokens per sample, hidden, heads, layers) of each transformer stack."""
    total = 0
    for s, h, a, n in towers:
        per_layer = layer_activations(s, h, a, micro_batch)
        total += (n * 2 * s * micro_batch * h + per_layer) if checkpointing else n * per_layer
    return total


@dataclass
class Need:
    preset: str
    zero_stage: int
    offload: bool
    model_states: int
    teacher: int
    activations: int

    @property
    def total(self) -> int:
        return self.model_states + self.teacher + self.activations


def needs(n_params: int, largest_param: int, world: int, gpus_per_node: int, activation_bytes: int,
          teacher_params: int = 0) -> list[Need]:
    """The per-GPU need of every preset `auto` may pick."""
    gpn = max(1, min(gpus_per_node, world))
    nodes = max(1, -(-world // gpn))
    out = []
    for preset, stage, offload in PRESETS:
        teacher = 2 * teacher_params // (world if stage == 3 else 1)
        out.append(Need(preset, stage, offload, model_states(n_params, largest_param, stage, offload, gpn, nodes),
                        teacher, activation_bytes))
    return out


def choose(candidates: list[Need], gpu_mem: int) -> Need:
    """The first preset that fits (the least sharding/communication that fits), else the last one."""
    for n in candidates:
        if n.total <= HEADROOM * gpu_mem:
            return n
    return candidates[-1]


def gpu_memory(text: str | None) -> int:
    """`train.gpu_mem` / `--gpu-mem`, else this machine's first CUDA device, else 80 GiB."""
    if text:
        return parse_bytes(text)
    import torch
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return DEFAULT_GPU_MEM
