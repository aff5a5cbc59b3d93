"""The chain manifest: `<out>/manifest.json`, one record per stage (status, sizes, cost, job ids).

Written atomically (temp file + rename) under a file lock, so a killed process never leaves a torn
manifest and concurrent writers (a SLURM submitter and a running stage) do not lose updates.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import CompTError
from ..files import atomic_write_text

# Freed when the disk is full, to make room for the manifest update recording that.
RESERVE, RESERVE_BYTES = ".manifest.reserve", 64 * 1024
HISTORY = 20   # status changes kept per stage (a requeue loop must not grow the manifest forever)
STATUSES = ("pending", "submitted", "running", "preempted", "done", "failed")


class Manifest:
    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "manifest.json"

    @contextmanager
    def _locked(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict:
        if not self.path.is_file():
            return {"chain": None, "stages": {}}
        return json.loads(self.path.read_text())

    def stage(self, name: str) -> dict:
        return self.read()["stages"].get(name, {})

    def init(self, spec) -> None:
        """Record every stage of the spec (keeping what earlier runs recorded)."""
        with self._locked():
            data = self.read()
            data["chain"] = spec.name
            data["spec"] = spec.source
            stages = data.setdefault("stages", {})
            for kind, items in (("chain", spec.stages), ("baseline", spec.baselines)):
                for i, s in enumerate(items):
                    rec = stages.setdefault(s.name, {"status": "pending"})
                    rec.update(kind=kind, index=i, model=s.model)
            atomic_write_text(self.path, _dumps(data))

    def reserve(self, owner: str = "") -> None:
        """Set aside a few KB beside the manifest, freed on ENOSPC so a full disk can still be recorded.
        One file per `owner` (a stage): stages running at once in one --out each hold and release theirs."""
        reserve = self._reserve_path(owner)
        if not reserve.is_file() or reserve.stat().st_size < RESERVE_BYTES:
            try:
                with open(reserve, "wb") as f:
                    f.write(b"\0" * RESERVE_BYTES)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                reserve.unlink(missing_ok=True)

    def release_reserve(self, owner: str = "") -> None:
        """The run is over: its reserve is no output of it, so none is left in --out."""
        self._reserve_path(owner).unlink(missing_ok=True)

    def _reserve_path(self, owner: str) -> Path:
        return self.out_dir / (f"{RESERVE}-{owner}" if owner else RESERVE)

    def update_stage(self, name: str, **fields) -> dict:
        try:
            return self._update_stage(name, **fields)
        except OSError as e:
            reserves = list(self.out_dir.glob(f"{RESERVE}*"))
            if e.errno != errno.ENOSPC or not reserves:
                raise
            for r in reserves:   # whoever's: the record of a full disk matters more than their slack
                r.unlink(missing_ok=True)
            return self._update_stage(name, **fields)

    def _update_stage(self, name: str, **fields) -> dict:
        with self._locked():
            data = self.read()
            rec = data.setdefault("stages", {}).setdefault(name, {"status": "pending"})
            if "status" in fields:
                assert fields["status"] in STATUSES, fields["status"]
                fields.setdefault("updated", time.time())
            bad = [k for k, v in fields.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:  # JSON has no NaN/Infinity: a bare NaN would make the whole manifest unreadable
                raise CompTError(f"stage {name}: refusing to record non-finite {', '.join(bad)} in {self.path}")
            rec.update(fields)
            if "status" in fields:
                rec["history"] = (rec.get("history") or [])[-(HISTORY - 1):] + [_change(fields)]
            atomic_write_text(self.path, _dumps(data))
            return rec

    def is_done(self, name: str) -> bool:
        return self.stage(name).get("status") == "done"


def _change(fields: dict) -> dict:
    """Who set a status, where: on a multi-node job the node (SLURM's name for it) and the global
    rank, so a record written by a rank other than 0, or twice, shows in the history."""
    rank = os.environ.get("RANK")
    return {"status": fields["status"], "at": fields["updated"],
            "node": os.environ.get("SLURMD_NODENAME") or os.uname().nodename,
            "rank": int(rank) if rank and rank.isdigit() else None}


def _dumps(data: dict) -> str:
    """Strict JSON: a non-finite number anywhere raises instead of writing a bare NaN/Infinity."""
    try:
        return json.dumps(data, indent=2, allow_nan=False)
    except ValueError as e:
        raise CompTError(f"manifest: {e}") from None
