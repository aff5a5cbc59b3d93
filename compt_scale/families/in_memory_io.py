"""ModelIO for families whose models fit whole on every rank (open_clip towers, small test
families): built whole, grown in memory from the predecessor's state dict (grow_state), exported on
rank 0 from the engine's gathered state."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import CompTError


class InMemoryIO:
    """`build`, `heads`, `load` and `save` are the family's own functions:
    build(cfg, seed), heads(cfg, teacher_cfg, ifd), load(path) -> model, save(model, state, data_dir, out)."""

    def __init__(self, build: Callable, heads: Callable, load: Callable, save: Callable, config_of: Callable):
        self._build, self._heads, self._load, self._save, self._config_of = build, heads, load, save, config_of

    def build_student(self, cfg, seed: int, ds_config: dict) -> torch.nn.Module:
        return self._build(cfg, seed)

    def ifd_heads(self, cfg, teacher_cfg, ifd, ds_config: dict) -> list[torch.nn.Module]:
        return self._heads(cfg, teacher_cfg, ifd)

    def fill(self, student, source: Path, source_cfg, cfg, growth) -> dict:
        from ..grow import grow_state
        src = self._load(source)
        grown, report = grow_state(src.state_dict(), self._config_of(src), cfg, student.state_dict(),
                                   width=growth.width, depth=growth.depth)
        student.load_state_dict(grown)
        return report

    def load_teacher(self, export: Path, dtype: torch.dtype, ds_config: dict,
                     replicate: bool) -> tuple[torch.nn.Module, bool]:
        return self._load(export), False

    def export(self, student, engine, dtype: torch.dtype, data_dir: Path, out: Path, shard_bytes: int) -> None:
        import torch.distributed as dist

        from ..train.checkpoint import gather_student_state
        if engine is None:
            self._save(student, student.state_dict(), data_dir, out)
            return
        state = gather_student_state(engine)   # ZeRO-3: DeepSpeed consolidates the partitions on rank 0
        if dist.get_rank() == 0:
            self._save(student, state, data_dir, out)

    def export_as_is(self, init: Path, data_dir: Path, out: Path) -> None:
        raise CompTError(f"init: {init}: this family cannot start from an init: model")
