"""The chain planner: budgets from a baseline budget + target speedup (rule 3), costs, ratio warnings."""
from __future__ import annotations

import pytest
import yaml

from compt_scale.chain import planner
from compt_scale.chain.planner import format_plan, plan_rows, plan_summary, with_budgets
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


def _explicit(raw, tokens):
    """The same chain with hand-written budgets (no budget:), and its predicted speedup."""
    raw = dict(raw, budget=None, stages=[dict(st, tokens=t) for st, t in zip(raw["stages"], tokens, strict=True)])
    raw["baselines"] = [dict(raw["baselines"][0], tokens=tokens[0])]
    spec = parse_chain(raw)
    return plan_summary(spec)["speedup"]


def test_budget_reproduces_the_papers_four_model_allocation():
    # Paper (CC3M, ViT-T -> S -> B -> L): ViT-T trains the standard 128 epochs, the grown models
    # 24, 18, 12 epochs (Table 4a: ViT-S 24, ViT-B 18; measured minima 23.45 / 18.28 / 12.34, Fig. 8),
    # a linear decrease of 6 epochs per model. One "epoch" here: 50 optimizer steps of 4 x 64 tokens.
    epoch = 50 * 4 * 64
    paper = [128 * epoch, 24 * epoch, 18 * epoch, 12 * epoch]
    raw = spec_raw(budget=None)
    raw["stages"].append({"name": "xl", "model": "llama-l"})
    raw["baselines"] = [{"name": "base-xl", "model": "llama-l"}]
    # target: the speedup that allocation has (largest model alone on 128 epochs vs the chain)
    target = _explicit(raw, paper)
    spec = parse_chain(dict(raw, budget={"baseline_tokens": 128 * epoch, "target_speedup": target}))
    assert [s.tokens for s in spec.stages] == paper
    assert spec.baselines[0].tokens == 128 * epoch
    text = format_plan(spec)
    assert "s: tokens <- rule 3: m1 gets the standard budget" in text
    assert "xl: tokens <- rule 3: linear decrease, 2 x" in text


def test_budget_three_models_hand_computed():
    # m1 = the baseline's 4,000,000 tokens (15625 steps of 256); the grown models 3 and 2 units of
    # 300 steps: 230,400 and 153,600 tokens.
    raw = spec_raw()
    expected = [4_000_000, 3 * 300 * 256, 2 * 300 * 256]
    target = _explicit(raw, expected)
    spec = parse_chain(spec_raw(budget={"baseline_tokens": 4_000_000, "target_speedup": target}))
    assert [s.tokens for s in spec.stages] == expected
    rows = plan_rows(spec)
    costs = [planner.stage_cost(spec, st, st.tokens)["macs"] for st in spec.stages]
    assert [r["macs"] for r in rows[:3]] == costs and rows[2]["accumulated_macs"] == sum(costs)
    assert rows[1]["teacher_macs"] > 0 and rows[0]["teacher_macs"] == 0
    s = plan_summary(spec, rows)
    assert s["speedup"] == pytest.approx(planner.baseline_cost(spec, 4_000_000)["macs"] / sum(costs), rel=1e-12)
    assert rows[-1]["kind"] == "baseline" and rows[-1]["macs"] == s["baseline_macs"]
    # the 3x target of spec_raw: m1 at the standard budget, then a 3:2 ramp within step rounding
    spec = parse_chain(spec_raw())
    t = [st.tokens for st in spec.stages]
    assert t[0] == 4_000_000 and abs(2 * t[1] - 3 * t[2]) <= 5 * 256
    assert plan_summary(spec)["speedup"] == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize("tokens,expect", [(100_000, "smaller model"), (100_000_000, "larger model"),
                                           (None, None)])
def test_rule1_tokens_per_param_band(tokens, expect):
    raw = spec_raw(budget=None)
    raw["stages"] = [{"name": "s", "model": "llama-xs", "tokens": 1}, {"name": "m", "model": "llama-s",
                                                                       "tokens": 100_000}]
    raw["baselines"] = []
    params = plan_rows(parse_chain(raw))[0]["params"]
    # Chinchilla's ~20 tokens/param, band 5-80: 0.25 and 250 tokens/param are outside, 20 inside
    raw["stages"][0]["tokens"] = tokens if tokens is not None else 20 * params
    first = plan_rows(parse_chain(raw))[0]
    rule1 = [w for w in first["warnings"] if "rule 1" in w]
    if expect is None:
        assert rule1 == []
    else:
        assert len(rule1) == 1 and expect in rule1[0]
        tpp = tokens / params
        assert (tpp < 5) == (expect == "smaller model") and (tpp > 80) == (expect == "larger model")


def test_fill_is_idempotent_pure_and_conflicts_are_errors():
    spec = parse_chain(spec_raw())
    before = [s.tokens for s in spec.stages]
    assert [s.tokens for s in with_budgets(spec).stages] == before
    raw_spec = parse_only(spec_raw())
    assert all(s.tokens is None for s in raw_spec.stages)
    filled = with_budgets(raw_spec)
    # a new value: the parsed spec is never changed, and holds no planner caches
    assert all(s.tokens is None for s in raw_spec.stages) and [s.tokens for s in filled.stages] == before
    assert not any(k.startswith("_") for k in vars(raw_spec))
    raw = spec_raw()
    raw["stages"][1]["tokens"] = 12_345
    with pytest.raises(CompTError, match=r"stages\[1\]\.tokens"):
        parse_chain(raw)


def test_infeasible_target_is_an_error():
    with pytest.raises(CompTError, match="the first model 's' alone on the standard budget"):
        parse_chain(spec_raw(budget={"baseline_tokens": 20_000, "target_speedup": 500.0}))
    # the most the chain can give: the largest model alone vs m1 alone, both on the standard budget
    spec = parse_chain(spec_raw())
    limit = planner.baseline_cost(spec, 19_968)["macs"] / planner.stage_cost(spec, spec.stages[0], 19_968)["macs"]
    with pytest.raises(CompTError, match="less than one optimizer step"):
        parse_chain(spec_raw(budget={"baseline_tokens": 19_968, "target_speedup": limit * 0.999}))
    # a few steps per grown stage: rounding to whole steps lands far from the target
    with pytest.raises(CompTError, match="infeasible at whole optimizer steps"):
        parse_chain(spec_raw(budget={"baseline_tokens": 19_968, "target_speedup": limit * 0.8}))


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
    bad.write_text(yaml.safe_dump(spec_raw(budget={"baseline_tokens": 20_000, "target_speedup": 500.0})))
    assert main(["plan", str(bad)]) == 2
    assert "infeasible" in capsys.readouterr().err
