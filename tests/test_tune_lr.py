"""`compt-scale tune-lr` (chain/tune_lr.py): a short sweep per model size picks the candidate with the
lowest measured val loss. The oracle is each candidate run's own metrics.jsonl (the final line the
stage wrote), read here independently of the sweep's bookkeeping."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import read_metrics, run_cli, write_spec


@pytest.mark.slow
def test_tune_lr_picks_the_lowest_val_loss(tmp_path, tiny_data):
    """One distinct model (a chain stage and its baseline), two candidates 3 steps each."""
    spec = write_spec(tmp_path / "c.yaml", [{"name": "a", "model": "llama-xs", "tokens": 128}],
                      data_dir=tiny_data, baselines=[{"name": "a-ind", "model": "llama-xs", "tokens": 256}])
    out = tmp_path / "tune"
    proc = run_cli("tune-lr", spec, "--out", out, "--candidates", "3e-3,1e-4", "--steps", "3")
    result = json.loads((out / "tune_lr.json").read_text())
    assert list(result["models"]) == ["llama-xs"] and result["steps"] == 3
    measured = {}
    for lr in (1e-4, 3e-3):
        metrics = read_metrics(out / "llama-xs" / f"lr{lr:g}-3steps" / "candidate")
        final = [m for m in metrics if m.get("final")]
        assert len(final) == 1 and final[0]["step"] == 3
        measured[lr] = final[0]["val_loss"]
    assert measured[1e-4] != measured[3e-3]   # two distinct runs, else the pick below proves nothing
    best = min(measured, key=measured.get)
    got = result["models"]["llama-xs"]
    assert got["best_lr"] == best and got["best_val_loss"] == measured[best]
    assert {c["lr"]: c["val_loss"] for c in got["candidates"]} == measured
    # The snippet: both stages of that model get the pick, and it is what the command printed.
    entries = yaml.safe_load((out / "tune_lr.yaml").read_text())
    assert entries == [{"name": "a", "train": {"lr": best}}, {"name": "a-ind", "train": {"lr": best}}]
    assert (out / "tune_lr.yaml").read_text() in proc.stdout
    # Bad input: one line, exit 2, nothing written.
    bad = write_spec(tmp_path / "bad.yaml", [], data_dir=tiny_data)
    for args, msg in [((bad,), "spec.stages: a chain needs at least one stage"),
                      ((spec, "--candidates", "3e-3,-1"), "--candidates: learning rates must be positive"),
                      ((spec, "--steps", "0"), "--steps must be >= 1, got 0")]:
        p = run_cli("tune-lr", *args, "--out", tmp_path / "bad-out", check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"compt-scale: error: {msg}"), p.stderr
        assert not (tmp_path / "bad-out").exists()
