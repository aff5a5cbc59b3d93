"""benchmarks/chain_speedup.py's matched-quality computation, on hand-made curves."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "chain_speedup.py"
spec = importlib.util.spec_from_file_location("chain_speedup", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_matched_quality_interpolates_the_first_crossing():
    curve = [(10.0, 5.0), (20.0, 4.0), (30.0, 3.0), (40.0, 3.5), (50.0, 2.0)]
    # 3.5 is crossed between x=20 (4.0) and x=30 (3.0): halfway.
    assert bench.matched_quality_macs(curve, 3.5) == pytest.approx(25.0)
    assert bench.matched_quality_macs(curve, 4.0) == 20.0        # reached exactly at an eval
    assert bench.matched_quality_macs(curve, 6.0) == 10.0        # already below at the first eval
    assert bench.matched_quality_macs(curve, 1.0) is None        # never reached


def test_gpu_chain_is_a_valid_growable_spec(tmp_path):
    from compt_scale.config import parse_chain
    from compt_scale.families import get_family
    spec = parse_chain(bench.gpu_spec(tmp_path, 12_000_000), base_dir=tmp_path)
    assert [s.name for s in spec.stages] == ["s1", "s2", "s3"]
    assert spec.stages[2].tokens < spec.stages[1].tokens < spec.stages[0].tokens  # rule 3
    fam = get_family("hf_decoder")
    sizes = [fam.param_count(fam.plan_config(spec, s)) / 1e6 for s in spec.stages]
    assert 12 < sizes[0] < 25 and 60 < sizes[1] < 120 and 250 < sizes[2] < 400, sizes
