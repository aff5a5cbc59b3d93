"""The stage lock (an O_EXCL file naming host, pid and job id) and stage-name rules: the cheap,
in-process half of the double-run protection (tests/test_interrupts.py drives real processes)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from compt_scale.chain import lock
from compt_scale.config import load_chain
from compt_scale.errors import CompTError
from conftest import TINY_DATA, TINY_TRAIN, run_cli


def write_lock(stage_dir, **holder):
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / ".lock").write_text(json.dumps(holder))
    return stage_dir / ".lock"


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    held = lock.StageLock(tmp_path / "a", "a").acquire()
    content = json.loads((tmp_path / "a" / ".lock").read_text())
    assert content["host"] == socket.gethostname() and content["pid"] == os.getpid()
    with pytest.raises(CompTError, match=rf"stage a is already running \(host {socket.gethostname()} pid {os.getpid()}"):
        lock.StageLock(tmp_path / "a", "a").acquire()
    held.release()
    assert not (tmp_path / "a").exists(), "a lock-only stage dir is removed again"
    lock.StageLock(tmp_path / "a", "a").acquire().release()


def test_stale_locks_are_taken_over(tmp_path, monkeypatch):
    host = socket.gethostname()
    # Same host, holder gone.
    write_lock(tmp_path / "dead", host=host, pid=dead_pid())
    lock.StageLock(tmp_path / "dead", "dead").acquire().release()
    # Same host, holder alive (our parent): held.
    write_lock(tmp_path / "alive", host=host, pid=os.getppid())
    with pytest.raises(CompTError, match="already running"):
        lock.StageLock(tmp_path / "alive", "alive").acquire()
    # Another host: held while its heartbeat is fresh, stale once it is older than STALE_SECONDS.
    p = write_lock(tmp_path / "remote", host="node-elsewhere", pid=1, job_id="77")
    with pytest.raises(CompTError, match="node-elsewhere pid 1, SLURM job 77"):
        lock.StageLock(tmp_path / "remote", "remote").acquire()
    old = time.time() - lock.STALE_SECONDS - 60
    os.utime(p, (old, old))
    lock.StageLock(tmp_path / "remote", "remote").acquire().release()
    # A requeued SLURM job finds its own previous attempt's lock: that attempt is surely gone.
    write_lock(tmp_path / "requeued", host="node-elsewhere", pid=1, job_id="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock.StageLock(tmp_path / "requeued", "requeued").acquire().release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    held = lock.StageLock(tmp_path / "a", "a").acquire()
    old = time.time() - 1000
    os.utime(held.path, (old, old))
    monkeypatch.setattr(lock, "HEARTBEAT_SECONDS", 0.0)
    lock.heartbeat()
    assert time.time() - held.path.stat().st_mtime < 60
    held.release()


def spec_with_name(tmp_path, name):
    spec = {"name": "n", "data": dict(TINY_DATA), "train": dict(TINY_TRAIN),
            "stages": [{"name": name, "model": "llama-xs", "tokens": 256}]}
    p = tmp_path / "n.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.mark.parametrize("name", [".", "..", "-a", "manifest.json", "chain.yaml", "data", "slurm", "a/b",
                                  "a.b", "", "report.html", "a b"])
def test_stage_names_that_collide_or_escape_are_rejected(tmp_path, name):
    with pytest.raises(CompTError, match=r"stages\[0\]\.name: .* must be letters, digits"):
        load_chain(spec_with_name(tmp_path, name))


@pytest.mark.parametrize("name", ["a", "s1", "llama_xs-2", "_x", "0"])
def test_identifier_stage_names_are_accepted(tmp_path, name):
    assert load_chain(spec_with_name(tmp_path, name)).stages[0].name == name


def test_bad_stage_name_is_one_line_exit_2(tmp_path):
    r = run_cli("plan", spec_with_name(tmp_path, ".."), check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "'..'" in r.stderr
