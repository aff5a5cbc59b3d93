"""benchmarks/chain_speedup.py's matched-quality computation, on hand-made curves."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "chain_speedup.py"
spec = importlib.util.spec_from_file_location("chain_speedup", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _run(out: Path, stages: dict, seconds_per_mac: dict | None = None):
    """A finished chain dir as far as analyse() reads it: manifest plus each stage's eval lines
    (with GPU-seconds = MACs x the stage's seconds_per_mac when given)."""
    import json
    out.mkdir()
    manifest = {}
    for name, (macs, curve) in stages.items():
        k = (seconds_per_mac or {}).get(name)
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "macs": x, "val_loss": y, **({"gpu_seconds": x * k} if k else {})}) + "\n"
            for i, (x, y) in enumerate(curve)))
        manifest[name] = {"params": 1, "tokens": 1, "macs": macs, "final_val_loss": curve[-1][1], "status": "done",
                          **({"gpu_seconds": macs * k} if k else {})}
    (out / "manifest.json").write_text(json.dumps({"stages": manifest}))


def test_analyse_accumulates_the_chain_and_interpolates_the_crossing(tmp_path):
    _run(tmp_path / "o", {
        "s1": (100.0, [(50.0, 6.0), (100.0, 5.0)]),
        "s2": (40.0, [(10.0, 5.0), (20.0, 4.0), (40.0, 3.0)]),
        "s2-indep": (200.0, [(100.0, 4.5), (200.0, 3.5)]),
        "s3": (80.0, [(40.0, 2.5), (80.0, 2.0)]),
        "s3-indep": (1000.0, [(500.0, 2.4), (1000.0, 2.0)])})
    res = bench.analyse(tmp_path / "o")
    m = res["models"]
    assert m["s1"]["matched_quality_speedup"] == pytest.approx(1.0) and m["s1"]["val_loss_rel_gap"] == 0
    # s2 crosses 3.5 halfway between its evals at 20 (4.0) and 40 (3.0), after s1's 100 MACs.
    assert m["s2"]["chain_macs_to_match"] == pytest.approx(130.0)
    assert m["s2"]["matched_quality_speedup"] == pytest.approx(200 / 130)
    assert m["s2"]["val_loss_rel_gap"] == pytest.approx(3.0 / 3.5 - 1)
    assert m["s3"]["chain_macs_to_match"] == pytest.approx(220.0)   # reached at its last eval
    assert m["s3"]["chain_accumulated_macs"] == pytest.approx(220.0)
    assert res["family_speedup"] == pytest.approx(1300 / 220) and res["unfinished"] == {}


def test_analyse_of_a_run_cut_short_keeps_what_finished(tmp_path):
    import json
    _run(tmp_path / "o", {"s1": (100.0, [(100.0, 5.0)]), "s2": (40.0, [(40.0, 3.0)]),
                          "s2-indep": (200.0, [(200.0, 3.5)]), "s3": (80.0, [(80.0, 2.0)])})
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    for rec in man["stages"].values():
        rec["status"] = "done"
    man["stages"]["s3-indep"] = {"status": "interrupted"}
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(man))
    res = bench.analyse(tmp_path / "o")
    assert sorted(res["models"]) == ["s1", "s2"] and res["unfinished"] == {"s3-indep": "interrupted"}
    assert "family_speedup" not in res


def test_gpu_chain_is_a_valid_growable_spec(tmp_path):
    from compt_scale.config import parse_chain
    from compt_scale.families import get_family
    spec = parse_chain(bench.gpu_spec(tmp_path, 12_000_000), base_dir=tmp_path)
    assert [s.name for s in spec.stages] == ["s1", "s2", "s3"]
    assert spec.stages[2].tokens < spec.stages[1].tokens < spec.stages[0].tokens  # rule 3
    fam = get_family("hf_decoder")
    sizes = [fam.param_count(fam.plan_config(spec, s)) / 1e6 for s in spec.stages]
    assert 12 < sizes[0] < 25 and 60 < sizes[1] < 120 and 250 < sizes[2] < 400, sizes


def test_analyse_gives_the_speedup_in_gpu_seconds(tmp_path):
    """Stages with a teacher cost more seconds per MAC (x2 here): the GPU-seconds speedup is lower."""
    stages = {"s1": (100.0, [(50.0, 6.0), (100.0, 5.0)]),
              "s2": (40.0, [(10.0, 5.0), (20.0, 4.0), (40.0, 3.0)]),
              "s2-indep": (200.0, [(100.0, 4.5), (200.0, 3.5)]),
              "s3": (80.0, [(40.0, 2.5), (80.0, 2.0)]),
              "s3-indep": (1000.0, [(500.0, 2.4), (1000.0, 2.0)])}
    _run(tmp_path / "o", stages, {"s1": 1.0, "s2": 2.0, "s2-indep": 1.0, "s3": 2.0, "s3-indep": 1.0})
    res = bench.analyse(tmp_path / "o")
    m = res["models"]
    # s2 crosses 3.5 at 30 of its MACs = 60 s, after s1's 100 s; s3 at its last eval: 100 + 80 + 160 s.
    assert m["s2"]["chain_gpu_seconds_to_match"] == pytest.approx(160.0)
    assert m["s2"]["matched_quality_speedup_gpu_seconds"] == pytest.approx(200 / 160)
    assert m["s3"]["chain_gpu_seconds_to_match"] == pytest.approx(340.0)
    assert res["family_speedup_gpu_seconds"] == pytest.approx(1300 / 340)
    assert res["family_speedup"] == pytest.approx(1300 / 220)      # the MACs axis is unchanged
