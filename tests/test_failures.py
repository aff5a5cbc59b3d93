"""Failures end as one line and a non-zero exit, and never cost an earlier checkpoint."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, write_spec

pytestmark = [pytest.mark.slow]


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def test_nan_loss_stops_with_one_line_and_keeps_checkpoints(tmp_path, tiny_data):
    # An absurd learning rate drives the weights (and the loss) to inf/NaN within a few steps.
    spec = write_spec(tmp_path / "nan.yaml", [{"name": "a", "model": "llama-xs", "tokens": 30 * 4 * 32}],
                      data_dir=tiny_data, train={"lr": 1.0e15, "warmup_steps": 3, "save_every": 1})
    proc = run_cli("stage", spec, "--stage", "a", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc)
    assert line.startswith("compt-scale: error: stage a: loss is not finite at step"), line
    bad_step = int(line.split("at step ")[1].split()[0])
    rec = json.loads((tmp_path / "o" / "manifest.json").read_text())["stages"]["a"]
    assert rec["status"] == "failed" and "not finite" in rec["error"]
    ckpts = tmp_path / "o" / "a" / "checkpoints"
    if bad_step > 1:  # the checkpoints of the steps before the NaN are still there
        assert (ckpts / "latest").read_text().strip() == f"global_step{bad_step - 1}"
    assert not (tmp_path / "o" / "a" / "model").exists()


def test_truncated_checkpoint_falls_back_then_is_a_one_line_error(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "t.yaml", [{"name": "a", "model": "llama-xs", "tokens": 10 * 4 * 32}],
                      data_dir=tiny_data, train={"save_every": 5})
    out = tmp_path / "o"
    run_cli("stage", spec, "--stage", "a", "--out", out)
    ckpts = out / "a" / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    assert tag == "global_step10" and (ckpts / "global_step5").is_dir()

    def truncate(tag):
        states = sorted((ckpts / tag).glob("*model_states.pt"))
        assert states
        data = states[0].read_bytes()
        states[0].write_bytes(data[: len(data) // 3])

    # The newest checkpoint truncated: the older kept one is used, and the resume says so.
    truncate(tag)
    proc = run_cli("stage", spec, "--stage", "a", "--out", out, "--resume", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(l.startswith("[resume]") and "global_step5" in l and "unreadable or truncated" in l
               for l in proc.stderr.splitlines()), proc.stderr[-2000:]
    # Every kept checkpoint truncated: one line naming the newest, exit 2.
    tag = (ckpts / "latest").read_text().strip()
    for t in sorted(p.name for p in ckpts.glob("global_step*")):
        truncate(t)
    proc = run_cli("stage", spec, "--stage", "a", "--out", out, "--resume", check=False)
    assert proc.returncode == 2
    assert "unreadable or truncated" in last_line(proc) and tag in last_line(proc), last_line(proc)
    # The export of the finished run is untouched by the failed resume.
    assert (out / "a" / "model" / "config.json").is_file()
