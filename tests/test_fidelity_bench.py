"""benchmarks/fidelity.py: its analysis on a hand-made run dir (fast), and its quick form end to end
through `compt-scale chain` (slow: one seed, the CoM-PT chain + the s3 baseline + IFD only)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"
spec = importlib.util.spec_from_file_location("fidelity", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _stage(out: Path, name: str, macs: float, seconds: float, curve: list[tuple[float, float]]) -> dict:
    (out / name).mkdir(parents=True)
    (out / name / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "tokens": i, "macs": x, "val_loss": y}) + "\n" for i, (x, y) in enumerate(curve)))
    return {"params": 1, "tokens": 1, "macs": macs, "seconds": seconds, "final_val_loss": curve[-1][1],
            "status": "done"}


def test_variants_and_wall_clock_by_hand(tmp_path):
    finals = {"scratch": (3.0, 3.2), "iwi_only": (2.8, 2.9), "ifd_only": (2.7, 2.75), "iwi_ifd": (2.5, 2.6)}
    for seed in (0, 1):
        main = tmp_path / f"seed{seed}" / "iwi_ifd"
        for v, pair in finals.items():
            out = tmp_path / f"seed{seed}" / v
            recs = {"s3": _stage(out, "s3", 80.0, 8.0, [(40.0, 3.5), (80.0, pair[seed])])}
            if v == "iwi_ifd":
                recs |= {"s1": _stage(main, "s1", 100.0, 10.0, [(100.0, 5.0)]),
                         "s2": _stage(main, "s2", 40.0, 4.0, [(40.0, 3.0)])}
                if seed == 0:  # s3 reaches 2.6 at 40 + 40 * 0.9 / 1.0 = 76 of its 80 MACs
                    recs["s3-indep"] = _stage(main, "s3-indep", 1000.0, 50.0, [(500.0, 2.7), (1000.0, 2.6)])
            (out / "manifest.json").write_text(json.dumps({"stages": recs}))
    res = bench.variant_results(tmp_path, [0, 1])
    assert res["scratch"]["mean_final_val_loss"] == pytest.approx(3.1)
    assert res["scratch"]["spread"] == pytest.approx(0.2) and res["scratch"]["per_seed"] == {"0": 3.0, "1": 3.2}
    assert res["ordering"] == ["iwi_ifd", "ifd_only", "iwi_only", "scratch"] and res["ordering_matches_paper"]
    stages = json.loads((tmp_path / "seed0" / "iwi_ifd" / "manifest.json").read_text())["stages"]
    wc = bench.wall_clock(tmp_path / "seed0" / "iwi_ifd", stages)
    # seconds: s1 10 + s2 4 + s3 8 x 76/80 = 21.6; the baseline's 50 s -> 50 / 21.6
    assert wc["chain_seconds_to_match"] == pytest.approx(21.6) and wc["speedup"] == pytest.approx(50 / 21.6)


@pytest.mark.heavy
@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """The CoM-PT chain and the independent s3 only (4 stage processes; the variants' own code path,
    growth.init random and ifd.enabled false, is run by test_lr_rule.py and the hand test above)."""
    out = tmp_path / "fidelity.json"
    env = dict(os.environ, PYTHONPATH=str(PATH.parents[1]))
    import subprocess
    proc = subprocess.run([sys.executable, str(PATH), "--quick", "--budget", "8192", "--seeds", "0",
                           "--variants", "--baselines", "s3", "--work", str(tmp_path / "w"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    stages = json.loads((tmp_path / "w" / "seed0" / "iwi_ifd" / "manifest.json").read_text())["stages"]
    assert res["complete"] and res["seeds"] == [0]
    assert res["ifd"] == {"alpha": "auto", "ratio": 0.1, "recalibrate": False}   # the paper's fixed alpha
    assert res["iwi_ifd"]["per_seed"] == {"0": stages["s3"]["final_val_loss"]}
    assert res["scratch"]["per_seed"] == {} and res["ordering"] is None   # not run: no ordering claimed
    assert (tmp_path / "w" / "seed0" / "iwi_ifd" / "s3" / "growth.json").exists()
    gap = (stages["s3"]["final_val_loss"] - stages["s3-indep"]["final_val_loss"]) / stages["s3-indep"]["final_val_loss"]
    assert res["lossless"]["s3"]["val_loss_rel_gap"] == pytest.approx(gap)
    # by hand: the chain's s3 trains on 0.25 B, its baseline on 2 B (trained to convergence)
    assert (stages["s3"]["tokens"], stages["s3-indep"]["tokens"]) == (2048, 16384)
    assert res["independent_tokens"] == 16384
    # s3-indep evaluates at s1's token counts: all of s1's evals are compared (a check on no evals is no check)
    s1_evals = [r["tokens"] for r in map(json.loads, (tmp_path / "w/seed0/iwi_ifd/s1/metrics.jsonl").open())
                if r.get("val_loss") is not None]
    assert res["fair_baseline"]["compared"] == len(set(s1_evals)) > 0
    # by hand: BASE_LR 6e-3 x BASE_WIDTH 12 / s3 hidden 48, the same for the chain s3 and its baseline
    assert stages["s3"]["hidden_lr"] == pytest.approx(1.5e-3) == stages["s3-indep"]["hidden_lr"]
    assert out.with_suffix(".png").stat().st_size > 10_000
