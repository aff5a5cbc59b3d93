"""A full disk, on a small tmpfs (needs root to mount; skipped otherwise): the stage says up front
how much space it needs, and a disk that fills up mid-run is recorded in the manifest as one line,
with no empty temp files and the earlier checkpoint kept (a resume after freeing space finishes)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from compt_scale.chain.manifest import Manifest
from conftest import REPO, run_cli, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size: str):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def empty_files(root):
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_size == 0 and ".tmp" in p.name]


def last_step(stage_dir):
    try:
        lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for ln in lines:
        try:
            steps.append(json.loads(ln).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps, default=0)


def fill(disk):
    """Write zeros until the filesystem is full; returns the filler file."""
    p = disk / "filler"
    with open(p, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return p


def test_too_small_disk_is_refused_up_front(tmp_path, tiny_data, small_disk):
    out = small_disk("2m") / "out"
    spec = write_spec(tmp_path / "s.yaml", [{"name": "a", "model": "llama-xs", "tokens": 10 * 4 * 32}],
                      data_dir=tiny_data)
    r = run_cli("stage", spec, "--stage", "a", "--out", out, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "not enough disk space" in last and "needs about" in last and "free" in last, last
    assert "Traceback" not in r.stderr
    assert not (out / "a" / "checkpoints").exists()
    assert Manifest(out).stage("a")["status"] == "failed"
    assert not empty_files(out)


def test_disk_full_mid_run_is_recorded_and_resumable(tmp_path, tiny_data, small_disk):
    disk = small_disk("64m")
    out = disk / "out"
    steps = 40
    spec = write_spec(tmp_path / "s.yaml", [{"name": "a", "model": "llama-xs", "tokens": steps * 4 * 32}],
                      data_dir=tiny_data, train={"save_every": 5, "eval_every": 1000})
    proc = subprocess.Popen([sys.executable, "-m", "compt_scale.cli", "stage", str(spec), "--stage", "a",
                             "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while last_step(out / "a") < 6:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGSTOP)      # fill the disk between two checkpoints
    filler = fill(disk)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert "no space left on device" in lines[-1], lines[-5:]
    assert "Traceback" not in err, err[-3000:]
    rec = Manifest(out).stage("a")
    assert rec["status"] == "failed" and "no space left" in rec["error"], rec
    assert not empty_files(out), empty_files(out)
    ckpt = out / "a" / "checkpoints"
    latest = (ckpt / "latest").read_text()
    assert sorted(p.name for p in ckpt.glob("global_step*")) == [latest], "the half-written checkpoint is removed"

    filler.unlink()
    run_cli("stage", spec, "--stage", "a", "--out", out, "--resume")
    assert Manifest(out).stage("a")["status"] == "done"
    assert last_step(out / "a") == steps
