"""One running instance per stage: `<out>/<stage>/.lock`, created with O_EXCL (atomic on local disks,
NFS v3+ and Lustre, where `flock` may be off), naming host, pid and SLURM job id.

A lock is stale, and taken over, when its holder is surely gone: same host and the pid is dead or
is now another process (its start time differs from the one the lock recorded: the pid was reused),
the same SLURM job id as ours (a requeued job: SLURM never runs two attempts of one job at once), an
empty or unreadable lock older than EMPTY_GRACE_SECONDS (a writer killed between create and write;
ours are written whole, via a temp file and a hard link), or, for a holder on another host, no
heartbeat (the lock's mtime, refreshed by the training loop at log/eval time) for STALE_SECONDS.

`<out>/.chain.lock` (OutLock) is the same kind of lock, held by a `chain` for its whole run.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from ..errors import CompTError

LOCK_NAME = ".lock"
STALE_SECONDS = float(os.environ.get("COMPT_LOCK_STALE_SECONDS", 3600))
HEARTBEAT_SECONDS = 30.0
EMPTY_GRACE_SECONDS = 10.0
OUT_LOCK_NAME = ".chain.lock"

_held: StageLock | None = None


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "start": process_start(os.getpid())}


def process_start(pid) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with the pid,
    the process's identity (a pid alone is reused). None where /proc does not say."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()   # the command name (field 2) may hold spaces
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def read_holder(path: Path) -> dict | None:
    """The lock's content ({} if unreadable/torn), or None if there is no lock."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {}
    except json.JSONDecodeError:
        return {}


def is_stale(holder: dict, mtime: float) -> bool:
    me = _me()
    if not holder.get("pid"):   # empty or torn: a writer killed before it wrote (or mid-write)
        return time.time() - mtime > EMPTY_GRACE_SECONDS
    if holder.get("job_id") and holder.get("job_id") == me["job_id"]:
        return True
    if holder.get("host") == me["host"]:
        if not _pid_alive(holder.get("pid")):
            return True
        start = process_start(holder["pid"])
        return bool(holder.get("start") and start and start != holder["start"])   # the pid was reused
    return time.time() - mtime > STALE_SECONDS


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}, since {holder.get('since', '?')}"


def busy_error(stage_dir: Path, holder: dict) -> CompTError:
    return CompTError(f"stage {Path(stage_dir).name} is already running ({describe(holder)}); "
                      f"lock {Path(stage_dir) / LOCK_NAME}")


def live_holder(stage_dir: Path) -> dict | None:
    """The holder of the stage's lock if it is alive (not stale), else None."""
    path = Path(stage_dir) / LOCK_NAME
    holder = read_holder(path)
    if holder is None:
        return None
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return None if is_stale(holder, mtime) else holder


class StageLock:
    def __init__(self, stage_dir: Path, name: str, lock_name: str = LOCK_NAME):
        self.path = Path(stage_dir) / lock_name
        self.name = name
        self.owner = _me()
        self.created_dir = False
        self.last_beat = 0.0

    def acquire(self) -> StageLock:
        global _held
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.created_dir = True
        for _ in range(3):
            if not self._create():
                self._clear_stale()
                continue
            self.last_beat = time.time()
            if self.path.name == LOCK_NAME:
                _held = self   # the training loop's heartbeat keeps this one fresh
            return self
        raise CompTError(f"{self._what()}: could not take the lock {self.path} (contended)")

    def _create(self) -> bool:
        """Create the lock whole (temp file, then a hard link: atomic and exclusive like O_EXCL, and
        never seen empty); False if it exists."""
        tmp = self.path.with_name(f"{self.path.name}.new-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(json.dumps(self.owner))
        except OSError as e:   # a read-only or full output dir
            tmp.unlink(missing_ok=True)
            raise CompTError(f"{self._what()}: cannot write the lock {self.path}: {e.strerror}") from None
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _what(self) -> str:
        return f"stage {self.name}"

    def _busy(self, holder: dict) -> CompTError:
        return busy_error(self.path.parent, holder)

    def _clear_stale(self) -> None:
        """Move a stale lock out of the way; a live one is an error naming its holder."""
        holder = read_holder(self.path)
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if holder is None:
            return
        if not is_stale(holder, mtime):
            self._drop_dir()
            raise self._busy(holder)
        self._take_over(holder)

    def _take_over(self, stale: dict) -> None:
        # Move the stale lock aside, then check it is the one judged stale: another taker may have
        # replaced it in between, in which case its fresh lock is put back.
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if read_holder(aside) != stale:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def heartbeat(self) -> None:
        now = time.time()
        if now - self.last_beat >= HEARTBEAT_SECONDS:
            self.last_beat = now
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        global _held
        if read_holder(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        self._drop_dir()
        _held = None if _held is self else _held

    def _drop_dir(self) -> None:
        # A stage that never got going must not leave an empty <out>/<stage>/ behind.
        if self.created_dir:
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


class OutLock(StageLock):
    """`<out>/.chain.lock`: one `chain` per output dir (a second one would launch the stages again
    and record their lock failures over the live run's records)."""

    def __init__(self, out: Path):
        super().__init__(out, Path(out).name, OUT_LOCK_NAME)

    def _what(self) -> str:
        return f"--out {self.path.parent}"

    def _busy(self, holder: dict) -> CompTError:
        return CompTError(f"--out {self.path.parent} is busy: another chain runs there ({describe(holder)}); "
                          f"lock {self.path}")


def heartbeat() -> None:
    """Keep this process's stage lock fresh (called by the training loop when it logs)."""
    if _held is not None:
        _held.heartbeat()
