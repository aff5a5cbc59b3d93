"""Free-space check before a stage writes anything large: its rolling checkpoints and its export.

DeepSpeed checkpoints hold the module weights plus the fp32 optimizer states (master copy, Adam m and
v): at most 16 bytes per parameter whatever the precision. `keep` checkpoints are kept and one more is
written before the oldest is removed; the export is fp32 weights (4 bytes per parameter).
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from ..errors import CompTError

CKPT_BYTES_PER_PARAM = 16
EXPORT_BYTES_PER_PARAM = 4
NEARLY_FULL = 1 << 20   # bytes free below which a failed write is taken for a full disk


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def bytes_needed(n_params: int, keep: int) -> int:
    return n_params * (CKPT_BYTES_PER_PARAM * (keep + 1) + EXPORT_BYTES_PER_PARAM)


def check_free_space(stage_dir: Path, n_params: int, keep: int) -> None:
    """One CompTError line when the stage's filesystem cannot hold what the stage will write."""
    stage_dir = Path(stage_dir)
    # What a resumed stage already has on disk (its kept checkpoints, an old export) is re-used space.
    need = max(0, bytes_needed(n_params, keep) - _size(stage_dir / "checkpoints") - _size(stage_dir / "model"))
    free = shutil.disk_usage(_existing(stage_dir)).free
    if need > free:
        raise CompTError(f"stage {stage_dir.name}: not enough disk space at {_existing(stage_dir)}: needs about "
                         f"{_gib(need)} for {keep + 1} checkpoints and the export of {n_params / 1e6:.1f}M "
                         f"params, {_gib(free)} free")


def free_space(path: Path) -> str:
    return _gib(shutil.disk_usage(_existing(Path(path))).free)


def out_of_space(e: BaseException, path: Path) -> bool:
    """Was this error a full disk? ENOSPC itself, or a library's wrapped write error (torch.save raises
    RuntimeError "file write failed" / "unexpected pos") while the filesystem is (nearly) full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(e):
        return True
    try:
        return isinstance(e, RuntimeError) and shutil.disk_usage(_existing(Path(path))).free < NEARLY_FULL
    except OSError:
        return False
