"""Process-group set-up shared by every entry point: one process, torchrun/deepspeed launchers, srun."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialize torch.distributed for DeepSpeed; returns (rank, world_size).

    A bare `python -m compt_scale.cli stage ...` becomes a world of one; under torchrun, the deepspeed
    launcher or srun the launcher's env is used. NCCL with GPUs, gloo on CPU (tests, CI).
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "WORLD_SIZE" not in os.environ:
        # srun without torchrun: one task per rank.
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    quiet_collective_deprecations()
    if not dist.is_initialized():
        import deepspeed

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


# torch deprecates the tensor collectives DeepSpeed's ZeRO-3 calls for every parameter it gathers or
# reduces (all_gather_into_tensor, reduce_scatter_tensor, their _base forms): ~65 FutureWarning lines
# per step, about code that is not ours. Only these messages are silenced; every other warning stays.
_COLLECTIVE_DEPRECATION = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|"
                           r"_reduce_scatter_base)` (is deprecated|is a private function)")


def quiet_collective_deprecations() -> None:
    import warnings
    warnings.filterwarnings("ignore", message=_COLLECTIVE_DEPRECATION, category=FutureWarning)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_flags(*flags: bool) -> list[bool]:
    """Any-rank OR of a few booleans in one collective (preemption, non-finite loss)."""
    t = torch.tensor([float(f) for f in flags], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_reduce_mean(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def broadcast_text(text: str | None) -> str | None:
    """Rank 0's string (or None) on every rank."""
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]
