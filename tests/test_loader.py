"""The prefetching loader hands over exactly the batches of the unprefetched path, from any resumed step,
and never leaves a thread behind."""
from __future__ import annotations

import threading

import pytest
import torch

from compt_scale.data.loader import PrefetchLoader
from compt_scale.data.packed import PackedTokens, sample_indices


def direct_batch(data, step, micro, ga, mb, rank, world, seed=0):
    """The unprefetched path the loop used before: indices for (step, micro, rank), then `.batch`."""
    return data.batch(sample_indices(len(data), seed, step, micro, ga, mb, rank, world))


@pytest.mark.parametrize("start,ga,rank,world", [(0, 1, 0, 1), (7, 3, 1, 2), (13, 2, 0, 3), (None, 2, 1, 2)])
def test_batches_equal_unprefetched_path_from_resumed_step(tiny_data, start, ga, rank, world):
    data = PackedTokens(tiny_data, "train", 32)
    mb = 4
    if start is None:  # resume 3 steps before the end of the first epoch: the run crosses into the next
        start = len(data) // (mb * ga * world) - 3
    steps = start + 9
    seen = []
    with PrefetchLoader(data, seed=0, start=start, steps=steps, grad_accum=ga, micro_batch=mb, rank=rank,
                        world=world, device=torch.device("cpu"), depth=2) as loader:
        for step, micro, batch in loader:
            want = direct_batch(data, step, micro, ga, mb, rank, world)
            assert len(batch) == 2
            for got, exp in zip(batch, want, strict=True):
                assert torch.equal(got, exp)
            seen.append((step, micro))
    assert seen == [(s, m) for s in range(start, steps) for m in range(ga)]
    assert not loader.thread.is_alive()


class FailsAt:
    """A dataset whose read of one sample fails (a torn file, say): the error must reach the loop."""

    def __init__(self, data, bad_call):
        self.data, self.bad_call, self.calls = data, bad_call, 0

    def __len__(self):
        return len(self.data)

    def batch(self, idx, step=None):
        self.calls += 1
        if self.calls == self.bad_call:
            raise OSError("torn read")
        return self.data.batch(idx)


def test_error_in_thread_is_raised_in_loop_and_thread_ends(tiny_data):
    data = FailsAt(PackedTokens(tiny_data, "train", 32), bad_call=3)
    loader = PrefetchLoader(data, seed=0, start=0, steps=10, grad_accum=1, micro_batch=2, rank=0, world=1,
                            device=torch.device("cpu"))
    with pytest.raises(OSError, match="torn read"), loader:
        for _ in loader:
            pass
    assert not loader.thread.is_alive()


def test_exception_in_loop_stops_a_blocked_producer(tiny_data):
    # depth 1 and a long run: the producer is blocked on a full queue when the loop fails.
    before = threading.active_count()
    loader = PrefetchLoader(PackedTokens(tiny_data, "train", 32), seed=0, start=0, steps=10_000, grad_accum=1,
                            micro_batch=2, rank=0, world=1, device=torch.device("cpu"), depth=1)
    with pytest.raises(RuntimeError, match="boom"), loader:
        next(loader)
        raise RuntimeError("boom")
    assert not loader.thread.is_alive()
    assert threading.active_count() == before
