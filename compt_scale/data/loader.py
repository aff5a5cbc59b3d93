"""A prefetching loader: the next micro-batches are read (and pinned) on a background thread.

The sample order is fully determined by (seed, step, micro-step, rank) through `sample_indices`, so
the thread simply walks the same (step, micro) sequence the loop will ask for, from the resumed step
on: prefetching never changes which samples a step sees, and a resumed run reads exactly what an
uninterrupted one would have. With CUDA the host tensors are pinned, so the copy to the device is
asynchronous (`non_blocking=True`) and overlaps the previous step's kernels.

The thread is a daemon bounded by a small queue; `close()` (or leaving the `with` block, also on an
exception) stops it and joins it, and an error inside the thread is re-raised in the loop.
"""
from __future__ import annotations

import contextlib
import queue
import threading

import torch

from .packed import sample_indices

_DONE = object()


class PrefetchLoader:
    """Iterates `(step, micro, batch)` for steps `start..steps-1`, each step's `grad_accum` micro-batches
    in order; `batch` is the dataset's tuple of tensors, already on `device`."""

    def __init__(self, dataset, *, seed: int, start: int, steps: int, grad_accum: int, micro_batch: int,
                 rank: int, world: int, device: torch.device, depth: int = 4, pin: bool | None = None):
        self.dataset, self.device = dataset, torch.device(device)
        self.order = {"seed": seed, "grad_accum": grad_accum, "micro_batch": micro_batch, "rank": rank,
                      "world": world}
        self.start, self.steps = start, steps
        # Pinning needs a CUDA driver; it is only worth it when the copy goes to a CUDA device.
        self.pin = (self.device.type == "cuda" and torch.cuda.is_available()) if pin is None else pin
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="compt-prefetch", daemon=True)
        self.thread.start()

    def host_batch(self, step: int, micro: int) -> tuple:
        """The micro-batch of (step, micro) on the host: what the thread prepares, and the unprefetched path."""
        o = self.order
        idx = sample_indices(len(self.dataset), o["seed"], step, micro, o["grad_accum"], o["micro_batch"],
                             o["rank"], o["world"])
        return tuple(self.dataset.batch(idx, step))  # step: LaCLIP's per-step caption draw

    def _put(self, item) -> bool:
        # Bounded wait so a stop request is seen even when the consumer is gone.
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _host_batches(self):
        """(step, micro, host batch) from the resumed step on: indexed, or a streamed dataset's own
        stream (data/webdataset_shards.py), which resumes from the micro-batches already consumed."""
        o, steps = self.order, range(self.start, self.steps)
        pairs = ((step, micro) for step in steps for micro in range(o["grad_accum"]))
        if not getattr(self.dataset, "streaming", False):
            yield from ((s, m, self.host_batch(s, m)) for s, m in pairs)
            return
        stream = self.dataset.stream(seed=o["seed"], start=self.start * o["grad_accum"],
                                     micro_batch=o["micro_batch"], rank=o["rank"], world=o["world"])
        try:
            for (step, micro), batch in zip(pairs, stream, strict=False):
                yield step, micro, batch
        finally:
            stream.close()

    def _produce(self) -> None:
        try:
            with contextlib.closing(self._host_batches()) as host_batches:
                for step, micro, batch in host_batches:
                    if self.stop.is_set():
                        return
                    if self.pin:
                        batch = tuple(t.pin_memory() for t in batch)
                    if not self._put((step, micro, batch)):
                        return
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int, tuple]:
        while True:
            try:
                item = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("prefetch thread ended without a batch") from None
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        step, micro, batch = item
        return step, micro, tuple(t.to(self.device, non_blocking=self.pin) for t in batch)

    def close(self) -> None:
        self.stop.set()
        while True:  # free a producer blocked on a full queue, and drop pinned buffers
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)

    def __enter__(self) -> PrefetchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def first_batches(dataset, *, seed: int, count: int, micro_batch: int, rank: int, world: int) -> list[tuple]:
    """This rank's first `count` micro-batches of the run (alpha calibration): step 0 with `count`
    micro-steps when indexed, the head of the rank's stream when streamed."""
    if getattr(dataset, "streaming", False):
        with contextlib.closing(dataset.stream(seed=seed, start=0, micro_batch=micro_batch, rank=rank,
                                               world=world)) as stream:
            return [next(stream) for _ in range(count)]
    return [tuple(dataset.batch(sample_indices(len(dataset), seed, 0, m, count, micro_batch, rank, world)))
            for m in range(count)]
