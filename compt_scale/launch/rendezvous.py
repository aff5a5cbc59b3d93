"""The address every node of a job dials for the c10d rendezvous: the head node's, resolved here.

A short host name may not resolve on the other nodes (or resolves to another network than the fast
one), and on many distributions a host's own name maps to a loopback address in /etc/hosts
(127.0.1.1), which the head node would then hand to every other node. So, in order:
  1. SLURM's own NodeAddr for the node (`scontrol show node`), where it is an address;
  2. the name (or NodeAddr) resolved to IPv4 addresses, loopback ones dropped;
  3. on the head node itself (the batch script runs there): its first address from `hostname -I`;
  4. the name unchanged, with a warning on stderr saying so.
`python -m compt_scale.launch.rendezvous HOST` prints the address (the sbatch template uses it).
"""
from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys


def _run(*cmd: str) -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout if r.returncode == 0 else ""


def _usable(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.version == 4 and not ip.is_loopback and not ip.is_unspecified


def node_addr(host: str) -> str | None:
    """SLURM's NodeAddr of `host`, or None (no scontrol, unknown node, or NodeAddr == the name)."""
    for tok in _run("scontrol", "show", "node", "-o", host).split():
        key, _, value = tok.partition("=")
        if key == "NodeAddr" and value and value != host:
            return value
    return None


def resolve(name: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return [a for a in dict.fromkeys(str(i[4][0]) for i in infos) if _usable(a)]  # AF_INET: (host, port)


def _is_this_host(host: str) -> bool:
    me = socket.gethostname()
    return host in (me, me.split(".")[0], socket.getfqdn())


def head_address(host: str, warn=lambda msg: print(msg, file=sys.stderr)) -> str:
    addr = node_addr(host)
    if addr and _usable(addr):
        return addr
    for name in filter(None, (addr, host)):
        found = resolve(name)
        if found:
            return found[0]
    if _is_this_host(host):
        own = [a for a in _run("hostname", "-I").split() if _usable(a)]
        if own:
            return own[0]
    warn(f"rendezvous: cannot resolve {host!r} to a non-loopback IPv4 address; using the name "
         "(set COMPT_RDZV_ADDR to override)")
    return host


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m compt_scale.launch.rendezvous HOST", file=sys.stderr)
        sys.exit(2)
    print(head_address(sys.argv[1]))
