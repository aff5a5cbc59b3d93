"""Expand a SLURM hostlist (`node[01-03,07],gpu-a1`) into host names, like `scontrol show hostnames`.

The batch script prefers scontrol; this is its fallback where scontrol cannot run (no slurm.conf,
e.g. a dry run on a laptop), and what the submitter uses to reason about allocations.
`python -m compt_scale.launch.hostlist 'node[01-03]'` prints one name per line.
"""
from __future__ import annotations

import re
import sys

from ..errors import CompTError


def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise CompTError(f"bad hostlist {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise CompTError(f"bad hostlist {s!r}: unbalanced '['")
    return parts + [cur]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if not m:
        return [item] if item else []
    prefix, suffix, out = item[:m.start()], item[m.end():], []
    for rng in m.group(1).split(","):
        lo, _, hi = rng.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise CompTError(f"bad hostlist range {rng!r} in {item!r}")
        width = len(lo)  # zero padding is kept: node[08-10] -> node08 node09 node10
        for i in range(int(lo), int(hi or lo) + 1):
            # Later bracket groups (rack[1-2]n[1-2]) expand recursively.
            out.extend(_expand_one(f"{prefix}{i:0{width}d}{suffix}"))
    return out


def expand(hostlist: str) -> list[str]:
    return [h for part in _split_top(hostlist.strip()) for h in _expand_one(part.strip())]


if __name__ == "__main__":
    try:
        print("\n".join(expand(sys.argv[1])))
    except (CompTError, IndexError) as e:
        print(f"hostlist: {e or 'usage: python -m compt_scale.launch.hostlist NODELIST'}", file=sys.stderr)
        sys.exit(2)
