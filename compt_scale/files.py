"""Writing outputs so that a crash never leaves half of one: atomic files, atomic dirs, and prepared
data dirs built exactly once under a lock (every rank, job or stage may ask for the same one)."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import CompTError


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave empty temp files behind
        raise


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Refuse, in one line and before anything is written, an output dir that cannot be made or
    written: a file there or in its path, or a read-only place. Leaves nothing behind (the write
    probe is removed again)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompTError(f"{flag} {out}: exists and is not a directory")
    nearest = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise CompTError(f"{flag} {out}: cannot create the output directory: {nearest} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=nearest))
    except OSError as e:   # read-only filesystem, no permission (EACCES/EPERM), ...
        raise CompTError(f"{flag} {out}: cannot write in {nearest}: {e.strerror}") from None


@contextmanager
def atomic_dir(out: Path, replace: bool = True):
    """Yield a temp dir next to `out`; if the body succeeds it becomes `out` whole, else it vanishes.

    replace=False refuses a non-empty `out` up front (user-facing outputs such as `grow --out`);
    replace=True swaps a previous version out (exports re-written by a resumed stage).
    """
    out = Path(out)
    if not replace and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompTError(f"output {out} already exists and is not empty")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        if e.errno == errno.ENOSPC:   # a full disk stays an OSError: the stage's disk-full handling owns it
            raise
        raise CompTError(f"output {out}: cannot create it: {e.strerror}") from None
    try:
        yield tmp
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def files_fingerprint(paths) -> dict:
    """What a prepared cache of these input files depends on, cheaply: per file its size, mtime and a
    hash of its first and last MiB (files of a dir, recursively). An edited corpus (any write moves
    the mtime) then has another fingerprint; a missing path is left for the reader to name."""
    files = []
    for p in map(Path, paths):
        files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    out = {}
    for f in files:
        try:
            st = f.stat()
            with open(f, "rb") as fh:
                digest = hashlib.sha1(fh.read(1 << 20))
                if st.st_size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    digest.update(fh.read())
        except OSError:
            continue
        out[str(f)] = f"{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()[:16]}"
    return out


def build_once(out: Path, key: dict, build: Callable[[Path], dict], files: dict | None = None) -> Path:
    """A prepared dir with a `meta.json`, built once. `build(tmp)` fills tmp and returns the meta;
    `key` (what determines the content) is stored in it as "spec". A dir built from another key is an
    error rather than silently reused or overwritten. `files`: the inputs' files_fingerprint; a dir
    built from other contents of the same files is rebuilt (saying so)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = files or {}
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta_p = out / "meta.json"
        if meta_p.is_file():
            meta = json.loads(meta_p.read_text())
            old = meta.get("spec", {})
            if {k: old.get(k) for k in key} != key:
                raise CompTError(f"data cache {out} was built from a different data spec; remove it or "
                                 "set data.cache_dir elsewhere")
            if meta.get("files", {}) == files:
                return out
            changed = sorted(set(files) ^ set(meta.get("files", {})) |
                             {f for f in files if meta.get("files", {}).get(f) != files[f]})
            print(f"[data] {changed[0]}{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''} "
                  f"changed since {out} was prepared: preparing it again", file=sys.stderr, flush=True)
        with atomic_dir(out) as tmp:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps({**meta, "spec": key, "files": files}, indent=2))
    return out
