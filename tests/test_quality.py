"""Matched-quality speedup and the baseline convergence flag, on hand-written eval curves."""
from __future__ import annotations

import pytest

from compt_scale.quality import (
    ahead_at_equal_tokens,
    describe,
    describe_fairness,
    eval_curve,
    macs_to_reach,
    matched_quality,
    still_improving,
)

CHAIN = [(10.0, 5.0), (20.0, 4.0), (30.0, 3.5)]          # this stage's (MACs, val loss)
FLAT_BASE = [(100.0, 6.0), (300.0, 3.05), (400.0, 3.02), (500.0, 3.0)]


def test_matched_quality_is_the_hand_computed_crossing():
    # target 3.8 is crossed between (20, 4.0) and (30, 3.5): 20 + 10 * 0.2 / 0.5 = 24 stage MACs,
    # plus 100 MACs of earlier stages = 124; the baseline cost 500 -> 500 / 124.
    q = matched_quality(CHAIN, 100.0, 3.5, FLAT_BASE, 500.0, 3.8)
    assert q["chain_macs_to_match"] == pytest.approx(124.0)
    assert q["speedup"] == pytest.approx(500 / 124)
    assert q["gap"] == pytest.approx((3.5 - 3.8) / 3.8) and q["lossless"]
    assert q["baseline_improving"] is None
    # a first eval already below the target counts at that eval (no curve before it)
    assert macs_to_reach(CHAIN, 5.5) == 10.0
    text = describe("m", "base", q)
    assert "speedup 4.03x" in text and "lossless" in text and "baseline converged" in text


def test_never_reached_claims_no_speedup():
    q = matched_quality(CHAIN, 100.0, 3.5, FLAT_BASE, 500.0, 3.48)
    assert q["chain_macs_to_match"] is None and q["speedup"] is None
    # 3.5 vs 3.48: +0.57%, outside the 0.5% of "lossless"
    assert q["gap"] == pytest.approx(0.02 / 3.48) and not q["lossless"]
    assert "no speedup claimed" in describe("m", "base", q)


def test_convergence_flag():
    assert still_improving(FLAT_BASE) is None  # 3.02 at 80% of the run -> 3.0: 0.67% < 1%
    # 300 -> 3.2, 500 -> 3.0: at 400 (80%) the curve is at 3.1, and 3.1 -> 3.0 is 3.3% > 1%
    improving = [(100.0, 6.0), (300.0, 3.2), (500.0, 3.0)]
    assert still_improving(improving) == pytest.approx(0.1 / 3.0)
    q = matched_quality(CHAIN, 0.0, 3.5, improving, 500.0, 3.0)
    assert "BASELINE NOT CONVERGED (still improving 3.3%" in describe("m", "base", q)


def test_eval_curve_reads_eval_and_final_lines():
    metrics = [{"step": 1, "macs": 5, "loss": 9.0}, {"step": 2, "macs": 10, "val_loss": 5.0},
               {"final": True, "step": 4, "macs": 20, "val_loss": 4.0},
               {"step": 4, "macs": 20, "val_loss": 4.1}]
    assert eval_curve(metrics) == [(10.0, 5.0), (20.0, 4.0)]


def test_baseline_ahead_at_equal_tokens():
    small = [{"step": 1, "tokens": 100, "loss": 9.0}, {"step": 2, "tokens": 200, "val_loss": 5.0},
             {"step": 4, "tokens": 400, "val_loss": 4.0}, {"final": True, "tokens": 600, "val_loss": 3.6}]
    big = [{"step": 2, "tokens": 200, "val_loss": 4.9}, {"step": 3, "tokens": 300, "val_loss": 4.2},
           {"step": 4, "tokens": 400, "val_loss": 3.9}, {"final": True, "tokens": 600, "val_loss": 3.5}]
    r = ahead_at_equal_tokens(small, big)      # compared at 200, 400, 600 tokens (300: small has none)
    assert r == {"compared": 3, "behind": [], "ahead": True}
    assert "ahead of the smaller xs at equal tokens at all 3 evals" in describe_fairness("m", "xs", r)
    big[2]["val_loss"] = 4.0                    # a tie is not ahead
    big[3]["val_loss"] = 3.7
    r = ahead_at_equal_tokens(small, big)
    assert r == {"compared": 3, "behind": [(400, 4.0, 4.0), (600, 3.7, 3.6)], "ahead": False}
    assert describe_fairness("m", "xs", r).startswith("UNFAIR BASELINE: m is not ahead of the smaller xs at 2 of 3")
    # evals at other token counts only: nothing compared, so no claim either way
    r = ahead_at_equal_tokens(small, [{"step": 3, "tokens": 300, "val_loss": 1.0}])
    assert r == {"compared": 0, "behind": [], "ahead": False}
    assert "no evals at equal tokens" in describe_fairness("m", "xs", r)
