"""benchmarks/throughput.py end to end on CPU (--cpu-smoke): the three setups run through the same code
paths as on the GPU (hand-wired HF + DeepSpeed, the trainer alone, the trainer with a teacher and IFD).
The GPU figures themselves come only from a GPU machine (benchmarks/gpu_all.sh)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
@pytest.mark.slow
def test_throughput_benchmark_runs_all_three_setups(tmp_path):
    out = tmp_path / "tp.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--cpu-smoke", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=400, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in "abc":   # a failed setup is recorded as {"error": ...}, not raised: check each
        r = res["results"][key]
        assert "error" not in r, r.get("error", "")[-2000:]
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0
    assert res["results"]["c"]["liger"] is False          # CPU: auto leaves liger off
    assert {"b_over_a", "c_time_over_b", "c_allowed"} <= res["checks"].keys()
