"""The chain planner: budgets from a baseline budget + target speedup (rule 3), costs, ratio warnings."""
from __future__ import annotations

import pytest
import yaml

from compt_scale.chain import planner
from compt_scale.chain.planner import fill_budgets, format_plan, plan_rows, plan_summary
from compt_scale.chain.resolve import resolve
from compt_scale.cli import main
from compt_scale.config import parse_chain as parse_only
from compt_scale.errors import CompTError


def parse_chain(raw):
    return resolve(parse_only(raw))


def spec_raw(**extra):
    raw = {"name": "t", "data": {"vocab_size": 512, "seq_len": 64},
           "train": {"micro_batch_size": 4, "warmup_steps": 2},
           "stages": [{"name": "s", "model": "llama-xs"}, {"name": "m", "model": "llama-s"},
                      {"name": "l", "model": "llama-m"}],
           "baselines": [{"name": "base-l", "model": "llama-m"}],
           "budget": {"baseline_tokens": 4_000_000, "target_speedup": 3.0}}
    raw.update(extra)
    return raw


def test_budget_fill_is_linear_and_speedup_is_the_cost_ratio():
    spec = parse_chain(spec_raw())  # validate_chain calls fill_budgets
    step = 4 * 64
    tokens = [s.tokens for s in spec.stages]
    assert all(t % step == 0 for t in tokens)  # whole optimizer steps
    assert tokens[0] > tokens[1] > tokens[2] > 0
    # rule 3: a linear ramp t_i = s (n - i), within one step of rounding per stage
    assert abs((tokens[0] - tokens[1]) - (tokens[1] - tokens[2])) <= 2 * step
    assert abs(tokens[0] - 3 * tokens[2]) <= 3 * step
    assert spec.baselines[0].tokens == 4_000_000

    rows = plan_rows(spec)
    chain = [r for r in rows if r["kind"] == "chain"]
    costs = [planner.stage_cost(spec, st, st.tokens, spec.stages[i - 1] if i else None)["macs"]
             for i, st in enumerate(spec.stages)]
    assert [r["macs"] for r in chain] == costs
    assert chain[-1]["accumulated_macs"] == sum(costs)
    assert chain[1]["teacher_macs"] > 0 and chain[0]["teacher_macs"] == 0
    s = plan_summary(spec, rows)
    base = planner.baseline_cost(spec, 4_000_000)["macs"]
    assert s["baseline_macs"] == base
    assert s["speedup"] == pytest.approx(base / sum(costs), rel=1e-12)
    assert s["speedup"] == pytest.approx(3.0, rel=0.01)  # the target, up to step rounding
    # the listed baseline of the largest model costs what the budget's baseline costs
    assert rows[-1]["kind"] == "baseline" and rows[-1]["macs"] == base


def test_fill_is_idempotent_and_conflicts_are_errors():
    spec = parse_chain(spec_raw())
    before = [s.tokens for s in spec.stages]
    fill_budgets(spec)
    assert [s.tokens for s in spec.stages] == before
    raw = spec_raw()
    raw["stages"][1]["tokens"] = 12_345
    with pytest.raises(CompTError, match=r"stages\[1\]\.tokens"):
        parse_chain(raw)


def test_infeasible_target_is_an_error():
    with pytest.raises(CompTError, match="less than one optimizer step"):
        parse_chain(spec_raw(budget={"baseline_tokens": 20_000, "target_speedup": 500.0}))
    # a few steps per stage: rounding to whole steps lands far from the target
    with pytest.raises(CompTError, match="infeasible at whole optimizer steps"):
        parse_chain(spec_raw(budget={"baseline_tokens": 20_000, "target_speedup": 50.0}))


def test_ratio_warnings_and_explicit_budgets():
    raw = spec_raw(budget=None)
    raw["stages"] = [{"name": "s", "model": "llama-xs", "tokens": 50_000},
                     {"name": "l", "model": "llama-m", "tokens": 20_000}]
    raw["baselines"] = [{"name": "base-l", "model": "llama-m", "tokens": 100_000}]
    spec = parse_chain(raw)
    rows = plan_rows(spec)
    assert rows[1]["ratio"] > 4 and "outside the paper's 2x-4x" in rows[1]["warnings"][0]
    s = plan_summary(spec, rows)
    assert s["speedup"] == pytest.approx(rows[2]["macs"] / rows[1]["accumulated_macs"])
    text = format_plan(spec)
    assert "warning: l: expansion ratio" in text and "predicted speedup" in text
    # without IFD the predecessor only initializes the student: no teacher forwards to pay for
    raw["stages"][1]["ifd"] = {"enabled": False}
    assert plan_rows(parse_chain(raw))[1]["teacher_macs"] == 0


def test_plan_cli(tmp_path, capsys):
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(spec_raw()))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "predicted speedup: 3.0" in out and "llama-m" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_raw(budget={"baseline_tokens": 20_000, "target_speedup": 50.0})))
    assert main(["plan", str(bad)]) == 2
    assert "infeasible" in capsys.readouterr().err
