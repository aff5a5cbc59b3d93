"""Under SLURM, the rendezvous store lives in node 0's launcher and outlives node 0's workers.

torch's c10d rendezvous hosts its TCPStore inside the agent of the node told `is_host`, and that
agent's process ends as soon as its own workers have ended. After a preemption the nodes' workers
exit 99 a few seconds apart; when node 0's are first, node 0's launcher exits, the store goes with it,
and every other node's agent, which polls the store while its workers are still writing their part of
the checkpoint, SIGTERMs them and fails with a "connection to the C10d store" error: the job exits 2
instead of 99 and is not requeued, and the other nodes' checkpoint shards may be torn.

So here node 0's launcher (compt_scale.launch.torchrun) opens the store itself, every agent (node 0's
included) joins it as a client (`is_host=0`), and when its own agent is done node 0's launcher keeps
the store up until every node's launcher has said it is done too (a counter in the store), for at
most EXIT_GRACE_S: a node that never says so (killed, lost) delays the failure that long, no longer.
"""
from __future__ import annotations

import time
from datetime import timedelta

EXIT_GRACE_S = 30.0
DONE_KEY = "compt/launchers_done"


def endpoint_of(argv: list[str]) -> tuple[str, int]:
    """(host, port) of torchrun's --rdzv_endpoint (port 29400, torch's default, when not given)."""
    args = dict(zip(argv, argv[1:], strict=False))
    text = args.get("--rdzv_endpoint", args.get("--rdzv-endpoint", ""))
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "29400")
    return host.strip("[]"), int(port)


def nnodes_of(argv: list[str]) -> int:
    """The most nodes torchrun's --nnodes allows ("2" or "1:2")."""
    args = dict(zip(argv, argv[1:], strict=False))
    return int(args.get("--nnodes", "1").split(":")[-1])


def open_store(argv: list[str], timeout_s: int):
    """Node 0: the rendezvous store's server, owned by this process (raises if the port is taken)."""
    from torch.distributed import TCPStore
    host, port = endpoint_of(argv)
    return TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                    timeout=timedelta(seconds=timeout_s))


def say_done(argv: list[str], timeout_s: float = 10.0) -> None:
    """Any other node: tell node 0's launcher this node's agent is done (best effort: node 0 waits
    EXIT_GRACE_S at most anyway)."""
    from torch.distributed import TCPStore
    host, port = endpoint_of(argv)
    try:
        TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s)).add(DONE_KEY, 1)
    except Exception:   # the store is gone (node 0 gave up waiting) or was never reached
        pass


def wait_for_every_node(store, nnodes: int, grace_s: float = EXIT_GRACE_S) -> int:
    """Node 0, its own agent done: keep the store up until all nnodes launchers are done or grace_s
    has passed. Returns how many were done."""
    done = store.add(DONE_KEY, 1)
    deadline = time.monotonic() + grace_s
    while done < nnodes and time.monotonic() < deadline:
        time.sleep(0.2)
        done = store.add(DONE_KEY, 0)
    return done
