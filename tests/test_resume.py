"""A stage killed with SIGKILL mid-run and resumed with --resume reproduces the uninterrupted losses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, last_step, reference_losses, run_cli, train_losses, write_spec

pytestmark = [pytest.mark.slow]

STEPS = 100


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "r.yaml", [{"name": "a", "model": "llama-s", "tokens": STEPS * 4 * 32}],
                      data_dir=tiny_data, train={"save_every": 10, "eval_every": 1000})
    ref = reference_losses(spec, tmp_path / "ref", STEPS)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "compt_scale.cli", "stage", str(spec), "--stage", "a", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while last_step(out / "a") < 25 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = last_step(out / "a")
    assert 25 <= killed_at < STEPS, f"the run must be killed mid-way (it reached step {killed_at})"
    assert not (out / "a" / "model").exists()

    run_cli("stage", spec, "--stage", "a", "--out", out, "--resume")
    resumed = train_losses(out / "a")
    assert sorted(resumed) == sorted(ref)
    for step in ref:
        assert resumed[step] == ref[step], f"step {step}: {resumed[step]} != {ref[step]}"
    final = lambda d: [json.loads(l) for l in (d / "a" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final(out)["val_loss"] == final(tmp_path / "ref")["val_loss"]


def test_without_resume_existing_checkpoints_are_never_overwritten(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "r.yaml", [{"name": "a", "model": "llama-xs", "tokens": 10 * 4 * 32}],
                      data_dir=tiny_data)
    run_cli("stage", spec, "--stage", "a", "--out", tmp_path / "o")
    before = sorted(p.name for p in (tmp_path / "o" / "a" / "checkpoints").iterdir())
    proc = run_cli("stage", spec, "--stage", "a", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "o" / "a" / "checkpoints").iterdir()) == before
