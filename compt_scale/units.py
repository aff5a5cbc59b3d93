"""Memory sizes as users write them (`train.gpu_mem`, `--gpu-mem`). Torch-free: the spec parser uses it."""
from __future__ import annotations

import re


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '24G', '81920MB' -> bytes (GB read as GiB, as nvidia-smi's figures are)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.I)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"not a memory size like 80GB: {text!r}")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))
