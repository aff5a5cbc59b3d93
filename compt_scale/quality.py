"""Matched-quality speedup: what the chain spent to reach an independent baseline's final val loss.

The paper's claim is "the same quality for less compute" (lossless: within 0.5% of the baseline).
A ratio of total MACs says nothing about quality, so for each chain model with an independent baseline
of the same model this computes:
- chain_macs_to_match: the MACs the chain had spent (all earlier chain stages, teacher forwards
  included, plus this stage up to that point) when this stage's val loss first reached the baseline's
  final val loss, interpolated linearly between the two eval points around the crossing. The stage's
  loss before its first eval is unknown, so a first eval already at or below the target counts at that
  eval's MACs (an upper bound on the cost: the speedup is then a lower bound). None: never reached.
- speedup = baseline total MACs / chain_macs_to_match (None when never reached: nothing is claimed).
- gap = (chain final val - baseline final val) / baseline final val; lossless when gap <= LOSSLESS.
- the baseline's convergence: a baseline still improving by more than CONVERGED_TOL over the last
  CONVERGED_TAIL of its run is flagged; "matching" an under-trained baseline proves little.
Inputs are eval curves: (macs, val_loss) points from metrics.jsonl (eval lines and the final line).
"""
from __future__ import annotations

from itertools import pairwise

LOSSLESS = 0.005        # the paper's "lossless": within 0.5% of the baseline
CONVERGED_TAIL = 0.2    # the last 20% of a baseline's run (by MACs) ...
CONVERGED_TOL = 0.01    # ... may improve its val loss by at most 1% for it to count as converged


def eval_curve(metrics: list[dict], axis: str = "macs") -> list[tuple[float, float]]:
    """(x, val_loss) of every eval line and the final line, sorted by x; one point per x (the final
    line wins over an eval at the same step). `axis`: "macs", or "gpu_seconds" (the stage's own wall
    clock x ranks, train/loop.py): the same definition of matched quality on a wall-clock axis."""
    pts = {}
    for m in sorted(metrics, key=lambda m: bool(m.get("final"))):
        if m.get("val_loss") is not None and m.get(axis) is not None:
            pts[float(m[axis])] = float(m["val_loss"])
    return sorted(pts.items())


def macs_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """This stage's MACs at which its val loss first reaches `target` (see the module doc), or None."""
    for k, (x, y) in enumerate(curve):
        if y <= target:
            if k == 0:
                return x
            x0, y0 = curve[k - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
    return None


def _loss_at(curve: list[tuple[float, float]], x: float) -> float:
    """The curve's val loss at `x`, linear between its points (clamped to its ends)."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in pairwise(curve):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def still_improving(curve: list[tuple[float, float]]) -> float | None:
    """The relative val-loss improvement over the last CONVERGED_TAIL of the run when it exceeds
    CONVERGED_TOL (not converged), else None. Too few evals to tell (< 2) counts as not converged."""
    if len(curve) < 2:
        return float("inf")
    end_x, end_y = curve[-1]
    before = _loss_at(curve, end_x * (1 - CONVERGED_TAIL))
    drop = (before - end_y) / end_y
    return drop if drop > CONVERGED_TOL else None


def matched_quality(chain_curve, chain_offset: float, chain_final: float,
                    base_curve, base_macs: float, base_final: float) -> dict:
    """One chain model against its independent baseline; `chain_offset`: the MACs of all earlier
    chain stages. Keys: target, chain_macs_to_match, speedup, gap, lossless, baseline_improving."""
    at = macs_to_reach(chain_curve, base_final)
    chain_macs = chain_offset + at if at is not None else None
    gap = (chain_final - base_final) / base_final
    return {"target": base_final, "chain_macs_to_match": chain_macs,
            "speedup": base_macs / chain_macs if chain_macs else None,
            "gap": gap, "lossless": gap <= LOSSLESS, "baseline_improving": still_improving(base_curve)}


def describe(name: str, base_name: str, q: dict, unit: str = "MACs") -> str:
    """One line for the terminal and the HTML report (`unit`: the x axis, MACs or GPU-seconds)."""
    if q["chain_macs_to_match"] is None:
        reach = f"never reaches the baseline's final val {q['target']:.4f}: no speedup claimed"
    else:
        at = f"{q['chain_macs_to_match']:.4e}" if unit == "MACs" else f"{q['chain_macs_to_match']:.1f}"
        reach = (f"reaches the baseline's final val {q['target']:.4f} at {at} chain "
                 f"{unit}: matched-quality speedup {q['speedup']:.2f}x")
    gap = f"final gap {100 * q['gap']:+.2f}% ({'lossless' if q['lossless'] else 'worse than lossless 0.5%'})"
    imp = q["baseline_improving"]
    conv = ("baseline converged" if imp is None else
            f"BASELINE NOT CONVERGED (still improving {100 * imp:.1f}% over its last "
            f"{100 * CONVERGED_TAIL:.0f}%: the comparison flatters the chain)" if imp != float("inf") else
            "BASELINE NOT CONVERGED (too few evals to tell)")
    return f"{name} vs {base_name}: {reach}; {gap}; {conv}"


def ahead_at_equal_tokens(small: list[dict], big: list[dict]) -> dict:
    """A fair baseline check: a larger model trained with a recipe suited to it is ahead of a smaller
    one at equal tokens. `small` and `big` are metrics.jsonl records; the evals compared are those at
    the same token counts (eval lines and the final line). Keys: compared (how many), behind: the
    (tokens, big's val, small's val) where the larger model is not strictly ahead; ahead: compared
    at least once and never behind (no common evals is no evidence of a fair baseline)."""
    def points(metrics):
        return {int(m["tokens"]): float(m["val_loss"]) for m in metrics
                if m.get("val_loss") is not None and m.get("tokens") is not None}
    s, b = points(small), points(big)
    common = sorted(set(s) & set(b))
    behind = [(t, b[t], s[t]) for t in common if b[t] >= s[t]]
    return {"compared": len(common), "behind": behind, "ahead": bool(common) and not behind}


def describe_fairness(big: str, small: str, r: dict) -> str:
    if not r["compared"]:
        return f"fair baseline: {big} and {small} have no evals at equal tokens to compare"
    if r["ahead"]:
        return f"fair baseline: {big} is ahead of the smaller {small} at equal tokens at all {r['compared']} evals"
    at = ", ".join(f"{t:,} tokens ({vb:.3f} vs {vs:.3f})" for t, vb, vs in r["behind"][:4])
    return (f"UNFAIR BASELINE: {big} is not ahead of the smaller {small} at {len(r['behind'])} of {r['compared']} "
            f"evals at equal tokens: {at}; its recipe (lr, warm-up) may handicap it")
