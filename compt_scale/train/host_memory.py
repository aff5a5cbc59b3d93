"""Host memory a phase has freed, given back to the OS (glibc's malloc keeps it otherwise).

glibc serves blocks below its mmap threshold from its heaps, and that threshold rises (up to 32 MiB)
each time a larger mmapped block is freed. Building a ZeRO-3 model under `deepspeed.zero.Init` makes
one full-size tensor per parameter, keeps its partition and frees the rest: the freed blocks are holes
between live partitions, ~2x the partitions' bytes, which malloc keeps and the later (larger,
mmapped) optimizer buffers never reuse. Measured on the ~214M student of benchmarks/memory.py (bf16,
ZeRO-3, 2 ranks): `malloc_trim(0)` gave back ~420 MiB per rank after the build and growth and ~310
MiB after `deepspeed.initialize` (which copies the partitions into flat buffers and frees the old
ones). It hands every free page in the heaps back; it touches no live allocation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3            # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 2**20     # blocks from 1 MiB up: their own mapping, unmapped when freed


@functools.cache
def _libc(name: str):
    """A glibc malloc function, or None (musl, macOS: other allocators, nothing to do here)."""
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name) if lib else None
    except (OSError, AttributeError):
        return None


def release_freed_host_memory() -> bool:
    """Give the pages malloc holds free back to the OS; True when some were released. Cheap (one
    walk of the heaps): called at phase boundaries (after the model is built and grown, after the
    DeepSpeed engine is set up), never per micro-batch."""
    trim = _libc("malloc_trim")
    return bool(trim(ctypes.c_size_t(0))) if trim is not None else False


def map_large_blocks() -> bool:
    """Tensors trained in host memory (CPU ranks): every block of 1 MiB or more gets its own mapping,
    returned to the OS when freed, instead of glibc's default, whose threshold climbs to 32 MiB and
    then keeps each freed gathered parameter and gradient in its heaps. Measured on the ~214M
    student: ~300 MiB (forward) + ~400 MiB (backward) per rank kept that way, never reused by the
    optimizer's first step (its buffers are larger, mmapped), so the step's peak carried them. Costs
    a page fault per page of each large block, activations included: a step of the demo's 4.3M-param
    m took 0.95 s instead of 0.52 s, so the stage sets it under ZeRO-3 only. True when set."""
    mallopt = _libc("mallopt")
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) if mallopt is not None else False
