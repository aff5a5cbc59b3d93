"""Preemption signals: SIGUSR1 (SLURM's warning), SIGTERM (SLURM's requeue, scancel, node shutdown),
SIGINT (Ctrl-C) and SIGHUP (the terminal closed) all mean "checkpoint and exit 99, to be resumed".
Stdlib only, so `stage` can install the handler first thing, before torch is imported: a signal
during start-up (data preparation, model build, growth) then ends the stage at the next phase
boundary with a record instead of killing it.
"""
from __future__ import annotations

import signal

from ..errors import EXIT_PREEMPTED

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preemption:
    """A flag set by the signal handlers; the training loop acts on it at the next step boundary."""

    def __init__(self):
        self.requested = False
        self.signal: str | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the checkpoint
        self.requested = True
        self.signal = signal.Signals(signum).name


_INSTANCE: Preemption | None = None


def install() -> Preemption:
    """The process's one Preemption (installed on first call)."""
    global _INSTANCE
    if _INSTANCE is None:
        _INSTANCE = Preemption()
    return _INSTANCE


def check_startup(phase: str) -> None:
    """End start-up with exit 99 if a preemption signal arrived; all ranks agree (any rank's signal
    stops every rank, so none is left waiting in a collective)."""
    requested = install().requested
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        from .distributed import all_reduce_flags
        (requested,) = all_reduce_flags(requested)
    if requested:
        import sys
        print(f"[preempted] signal during start-up ({phase}): exiting {EXIT_PREEMPTED} to be resumed",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED)
