"""`python -m compt_scale.launch.torchrun [--exit-file F] <torchrun args>`: torchrun, plus two things
a preemptible stage needs that torchrun itself does not do.

1. SIGUSR1 reaches the workers; so do SIGTERM and SIGINT, forwarded as USR1 (the same request to a
   stage). torchrun's agent does not forward USR1 (by default USR1 would just
   kill the agent and, with it, the workers without a checkpoint). This wrapper runs torchrun's agent
   in-process and installs its own USR1 handler that forwards the signal to the agent's children, the
   worker processes. A worker that has not yet installed its own USR1 handler (still importing torch)
   would be killed by the default action, so a worker is signalled only once /proc says it catches
   USR1; until then the signal stays pending and is retried.
2. Exit code 99 survives. torchrun turns any failed worker into exit code 1. The stage contract is
   "99 = checkpointed after a preemption signal, requeue me", so: exit 99 when at least one worker
   exited 99 and every other failed worker either exited 99 too or was killed by a signal (the agent
   SIGTERMs the rest once the first has exited); otherwise the code of the earliest worker that failed
   with its own code (1 when all died by signals). `--exit-file F` also writes that code to F, so a
   multi-node batch script can check every node (srun reports only the highest task exit code).
3. A rendezvous that fails (port taken on the first node, first node unreachable, a node missing)
   ends within COMPT_RDZV_TIMEOUT seconds (default 300) with one line naming the node and the
   endpoint and exit code 2 (that line is also the second line of the exit file), not a traceback
   after torch's default 600 s.

Used by slurm/stage.sbatch (one per node under srun) and launchers/torchrun.sh.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import EXIT_BAD_INPUT
from ..errors import EXIT_PREEMPTED as PREEMPTED
from . import store_host

_USR1_BIT = 1 << (signal.SIGUSR1 - 1)


def _children(pid: int) -> list[int]:
    """Direct children of pid, from /proc (no psutil dependency)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 is the ppid; the command name in field 2 may contain spaces, so split after ')'.
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) > 1 and int(rest[1]) == pid:
            kids.append(int(entry))
    return kids


def _catches_usr1(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & _USR1_BIT)
    except OSError:
        pass
    return False


class Usr1Forwarder:
    """On SIGUSR1: signal every worker (child) once, as soon as it catches USR1 itself."""

    def __init__(self, poll: float = 0.2):
        self.pending = threading.Event()
        self.signalled: set[int] = set()
        self.poll = poll
        self._lock = threading.Lock()

    def install(self) -> None:
        # SIGTERM (SLURM's requeue, scancel, `chain` stopped) and SIGINT (Ctrl-C) mean the same as USR1
        # to a stage: checkpoint and exit 99. torchrun's agent would instead SIGTERM the workers and
        # die with a traceback, so it is told to leave these two signals to us.
        # SIGHUP (the terminal closed) too. (torchrun's --signals-to-handle defaults from
        # PET_SIGNALS_TO_HANDLE; older torch reads the other.)
        os.environ["PET_SIGNALS_TO_HANDLE"] = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGQUIT"
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        threading.Thread(target=self._retry_loop, daemon=True, name="usr1-forward").start()

    def _on_signal(self, signum, frame) -> None:
        node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename   # SLURM's name: unique per node
        print(f"[compt torchrun] {signal.Signals(signum).name} on {node}: asking workers to "
              "checkpoint",
              file=sys.stderr, flush=True)
        self.pending.set()
        self.forward()

    def forward(self) -> None:
        with self._lock:
            for pid in _children(os.getpid()):
                if pid not in self.signalled and _catches_usr1(pid):
                    try:
                        os.kill(pid, signal.SIGUSR1)
                        self.signalled.add(pid)
                    except ProcessLookupError:
                        pass

    def _retry_loop(self) -> None:
        # Workers started after the signal (or still importing when it came) get it when ready.
        while True:
            self.pending.wait()
            self.forward()
            time.sleep(self.poll)


def exit_code_of(failures: dict) -> int:
    """Map torchrun's per-rank failures ({rank: ProcessFailure}) to this wrapper's exit code."""
    codes = [f.exitcode for f in failures.values()]
    if PREEMPTED in codes and all(c == PREEMPTED or c < 0 for c in codes):
        return PREEMPTED
    # A real failure: the earliest worker that exited with its own error code (not 99, not a signal).
    real = [f for f in failures.values() if f.exitcode > 0 and f.exitcode != PREEMPTED]
    return min(real, key=lambda f: f.timestamp).exitcode if real else 1


RDZV_TIMEOUT = 300  # s: every node must join (and reach the store) within this; COMPT_RDZV_TIMEOUT


def store_role(argv: list[str], env) -> str | None:
    """Under SLURM (stage.sbatch's c10d rendezvous): 'host' on node 0, whose launcher owns the store
    (launch/store_host.py says why), 'client' elsewhere; None off SLURM or with the user's own
    --rdzv_conf (torch decides then)."""
    if "SLURM_NODEID" not in env or any(a.split("=")[0] in ("--rdzv_conf", "--rdzv-conf") for a in argv):
        return None
    return "host" if env["SLURM_NODEID"] == "0" else "client"


def with_store_host(argv: list[str], env) -> list[str]:
    """Under SLURM every agent joins the store as a client (`is_host=0`): node 0's launcher hosts it
    at the rendezvous endpoint, the head node's resolved address (slurm/stage.sbatch), which is also
    what torch's own "is that me?" test misses where the node's name maps to loopback. The join and
    store timeouts are bounded by COMPT_RDZV_TIMEOUT, so a wrong address or port fails in minutes,
    not at the time limit."""
    if store_role(argv, env) is None:
        return argv
    timeout = rdzv_timeout(env)
    return ["--rdzv_conf", f"is_host=0,join_timeout={timeout},read_timeout={timeout}", *argv]


def rdzv_timeout(env) -> int:
    text = env.get("COMPT_RDZV_TIMEOUT", str(RDZV_TIMEOUT))
    if not text.isdigit() or int(text) <= 0:
        raise SystemExit(f"compt-scale: error: COMPT_RDZV_TIMEOUT must be whole seconds > 0, got {text!r}")
    return int(text)


def rendezvous_failure(e: BaseException, argv: list[str], env, waited: float) -> str:
    """The one line a failed rendezvous is reported with: which node, which endpoint, how long it
    tried (seconds since the agent started it), what to check."""
    args = dict(zip(argv, argv[1:], strict=False))
    endpoint = args.get("--rdzv_endpoint", args.get("--rdzv-endpoint", "?"))
    node = env.get("SLURMD_NODENAME") or os.uname().nodename
    cause = e.__cause__ or e.__context__
    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if cause is not None and str(cause):
        why += f" ({str(cause).splitlines()[0][:200]})"
    return (f"compt-scale: error: node {node} (node {env.get('SLURM_NODEID', '0')}) could not complete the "
            f"rendezvous at {endpoint}: gave up after {waited:.0f} s (COMPT_RDZV_TIMEOUT={rdzv_timeout(env)}): {why}; check that every node reaches "
            f"that address and port (COMPT_RDZV_ADDR, COMPT_RDZV_PORT, firewall, GLOO_SOCKET_IFNAME/"
            f"NCCL_SOCKET_IFNAME) and that no other process holds the port")


def rendezvous_watchdog(argv: list[str], env, exit_file: Path | None, started: float) -> None:
    """Under SLURM: if this node's agent has started no worker COMPT_RDZV_TIMEOUT + 10 s after it
    began, the rendezvous is stuck where torch's own timeouts do not reach (a connection accepted by
    something that never answers, e.g. another service on the port): one line, exit 2, from a thread,
    since the agent's own call never returns."""
    if "SLURM_NODEID" not in env:
        return
    limit = rdzv_timeout(env) + 10

    def watch() -> None:
        while time.monotonic() - started < limit:
            if _children(os.getpid()):
                return   # workers are running: the rendezvous completed
            time.sleep(1.0)
        line = rendezvous_failure(TimeoutError("no answer from the rendezvous store"), argv, env,
                                  time.monotonic() - started)
        print(line, file=sys.stderr, flush=True)
        if exit_file is not None:
            exit_file.parent.mkdir(parents=True, exist_ok=True)
            exit_file.write_text(f"{EXIT_BAD_INPUT}\n{line}\n")
        os._exit(EXIT_BAD_INPUT)

    threading.Thread(target=watch, daemon=True, name="rdzv-watchdog").start()


def run_agent(argv: list[str], started: float) -> tuple[int, str]:
    """torchrun's agent in this process: (exit code, the one-line error or "")."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run
    try:
        run(parse_args(argv))
        return 0, ""
    except ChildFailedError as e:
        code = exit_code_of(e.failures)
        what = "preempted: workers checkpointed" if code == PREEMPTED else "workers failed"
        print(f"[compt torchrun] {what} (exit codes "
              f"{sorted({f.exitcode for f in e.failures.values()})}) -> exit {code}",
              file=sys.stderr, flush=True)
        return code, ""
    except RendezvousError as e:
        return EXIT_BAD_INPUT, rendezvous_failure(e, argv, os.environ, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_file = None
    if argv[:1] == ["--exit-file"]:
        # "{node}" in the path becomes this node's index in the allocation (one file per node).
        exit_file = Path(argv[1].replace("{node}", os.environ.get("SLURM_NODEID", "0")))
        argv = argv[2:]
    role = store_role(argv, os.environ)   # before with_store_host adds its own --rdzv_conf
    argv = with_store_host(argv, os.environ)
    Usr1Forwarder().install()  # first: importing torch takes seconds, USR1 must not kill us meanwhile
    started, store = time.monotonic(), None
    rendezvous_watchdog(argv, os.environ, exit_file, started)
    try:
        store = store_host.open_store(argv, rdzv_timeout(os.environ)) if role == "host" else None
        code, error = run_agent(argv, started)
    except Exception as e:   # the store's port is taken on this (the first) node
        code, error = EXIT_BAD_INPUT, rendezvous_failure(e, argv, os.environ, time.monotonic() - started)
    if error:
        print(error, file=sys.stderr, flush=True)
    if exit_file is not None:
        exit_file.parent.mkdir(parents=True, exist_ok=True)
        exit_file.write_text(f"{code}\n{error}\n" if error else f"{code}\n")
    if store is not None:
        store_host.wait_for_every_node(store, store_host.nnodes_of(argv))
    elif role == "client":
        store_host.say_done(argv)
    return code


if __name__ == "__main__":
    sys.exit(main())
